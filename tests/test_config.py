import pytest

from trl_tip import TIPConfig
from trl_tip._compat import GKDConfig


def cfg(tmp_path, **kw):
    return TIPConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **kw)


def test_is_a_gkd_config_with_gkd_options(tmp_path):
    c = cfg(tmp_path, lmbda=0.7, beta=0.2, temperature=0.8, seq_kd=True, max_new_tokens=17)
    assert isinstance(c, GKDConfig)
    assert (c.lmbda, c.beta, c.temperature, c.seq_kd, c.max_new_tokens) == (0.7, 0.2, 0.8, True, 17)
    assert c.token_selection == "entropy_sample" and c.keep_ratio == 0.5


def test_gkd_validation_still_applies(tmp_path):
    with pytest.raises(ValueError, match="lmbda"):
        cfg(tmp_path, lmbda=1.5)


def test_keep_ratio_defaults_per_rule(tmp_path):
    assert cfg(tmp_path, token_selection="tip").keep_ratio == 0.5
    assert cfg(tmp_path, token_selection="all").keep_ratio is None
    assert cfg(tmp_path, token_selection="quadrants", quadrants=["q3"]).quadrants == ["Q3"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"token_selection": "top"}, "allowed values: all, random, entropy_topk"),
        ({"token_selection": "random", "keep_ratio": 0.0}, r"keep_ratio must be in \(0, 1\]"),
        ({"token_selection": "random", "keep_ratio": 1.2}, r"keep_ratio must be in \(0, 1\]"),
        ({"token_selection": "all", "keep_ratio": 0.5}, "keep_ratio is not used by token_selection='all'"),
        ({"entropy_alpha": -1.0}, "entropy_alpha must be >= 0"),
        ({"token_selection": "entropy_divergence_sample", "divergence_gamma": -0.5}, "divergence_gamma must be >= 0"),
        ({"divergence_gamma": 2.0}, "divergence_gamma only applies to token_selection='entropy_divergence_sample'"),
        ({"token_selection": "all", "entropy_alpha": 2.0}, "entropy_alpha only applies to"),
        ({"token_selection": "quadrants"}, "needs `quadrants`"),
        ({"token_selection": "quadrants", "quadrants": ["Q7"]}, "allowed values: Q1, Q2, Q3, Q4"),
        ({"token_selection": "tip", "quadrants": ["Q3"]}, "quadrants is only used with token_selection='quadrants'"),
        ({"tip_q3_share": 1.5}, "tip_q3_share"),
        ({"divergence": "tv"}, "allowed values: jsd, reverse_kl, forward_kl"),
        ({"divergence_top_k": 0}, "divergence_top_k"),
        ({"entropy_threshold": 0.5}, "Give both entropy_threshold and divergence_threshold"),
        ({"divergence_threshold": 0.5}, "Give both entropy_threshold and divergence_threshold"),
        ({"entropy_threshold": 1.5, "divergence_threshold": 0.5}, r"entropy_threshold must be in \[0, 1\]"),
        ({"entropy_threshold": 0.5, "divergence_threshold": 2.0}, r"divergence_threshold must be \[0, 1\]"),
        ({"entropy_threshold_quantile": 1.1}, "entropy_threshold_quantile"),
        ({"divergence_threshold_quantile": -0.1}, "divergence_threshold_quantile"),
        ({"tip_chunk_size": 0}, "tip_chunk_size"),
    ],
)
def test_bad_options_raise_naming_the_option(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cfg(tmp_path, **kwargs)


def test_kl_divergence_threshold_may_exceed_one(tmp_path):
    c = cfg(tmp_path, divergence="reverse_kl", entropy_threshold=0.3, divergence_threshold=2.5)
    assert c.divergence_threshold == 2.5


def test_cli_parser_builds_every_option(tmp_path):
    from transformers import HfArgumentParser

    (c,) = HfArgumentParser(TIPConfig).parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path), "--use_cpu", "--bf16", "false", "--report_to", "none",
            "--token_selection", "quadrants", "--quadrants", "Q1", "Q3", "--divergence", "forward_kl",
        ]
    )  # fmt: skip
    assert c.quadrants == ["Q1", "Q3"] and c.divergence == "forward_kl"
