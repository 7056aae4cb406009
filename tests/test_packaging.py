"""The installed distribution's metadata agrees with the package (one version, written in `trl_tip.__version__`)."""

from importlib.metadata import version

import trl_tip


def test_distribution_version_is_the_package_version():
    assert version("trl-tip") == trl_tip.__version__
