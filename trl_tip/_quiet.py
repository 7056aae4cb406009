"""Third-party messages that come from trl-tip's own imports and calls, not from the user's code, and how they are
silenced: narrowly, by the logger (or the call) that emits them, so that every other warning still reaches the user.

- bitsandbytes' CPU backend, when it is imported, tries to fetch an optional faster 4-bit CPU kernel from the Hub
  (`kernels-community/quantization-bitsandbytes`, through the `kernels` package, on CPUs with AVX512-BF16) and logs
  whenever it cannot ("Failed to load CPU gemm_4bit_forward ...": `kernels` missing, Hub offline, publisher not
  verifiable; `kernels` itself logs "Skipping publisher trust check ..." offline); it then uses its own kernel.
  bitsandbytes is imported by PEFT, which transformers' `Trainer` imports, so every `import trl_tip` triggers it.
  [`import_bitsandbytes_quietly`] imports it first, with the two loggers of that fetch (`kernels` and
  bitsandbytes' CPU backend) raised to ERROR for the duration of the import only: whatever the wording, the
  fetch's warnings are dropped; bitsandbytes' other import messages, and every later message of both, are kept.
  (It cannot be deferred until a 4-bit model is requested: PEFT imports it whenever the `Trainer` is imported.)
- TRL's "You are importing from 'trl.experimental'" warning when trl-tip imports `GKDTrainer`: see `_compat.py`.
- `GKDTrainer`'s "This GKD configuration ... is fully covered by `DistillationTrainer` ... Consider migrating" hint,
  when the trainer is a `TIPTrainer` (whose counterpart is `TIPDistillationTrainer`): see [`quiet_logger`].
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


__all__ = ["MessageFilter", "import_bitsandbytes_quietly", "quiet_logger", "raised_log_level"]

# The loggers of bitsandbytes' import-time kernel fetch: its CPU backend, and the `kernels` package (whose modules log
# under `kernels.*`, children that inherit the level set here).
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_LOGGER = "kernels"


class MessageFilter(logging.Filter):
    """Drops the log records whose message contains one of `fragments`."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


@contextmanager
def raised_log_level(names: Sequence[str], level: int = logging.ERROR) -> Iterator[None]:
    """Within the block, the loggers `names` (and their children that set no level of their own) emit only records of
    `level` or above; their levels are restored afterwards."""
    loggers = [logging.getLogger(name) for name in names]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(level, logger.level))
    try:
        yield
    finally:
        for logger, old_level in zip(loggers, previous):
            logger.setLevel(old_level)


def import_bitsandbytes_quietly() -> None:
    """Imports bitsandbytes, if installed and not imported yet, without the warnings of its optional kernel fetch;
    called when `trl_tip` is imported, before PEFT imports bitsandbytes (see the module docstring)."""
    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    with raised_log_level((BNB_CPU_LOGGER, KERNELS_LOGGER)):
        try:
            import bitsandbytes  # noqa: F401
        except (
            ImportError
        ):  # as PEFT does: an unusable bitsandbytes is PEFT's to report when a 4-bit model asks for it
            pass


@contextmanager
def quiet_logger(name: str, *fragments: str) -> Iterator[None]:
    """Within the block, drops the records of logger `name` whose message contains one of `fragments`."""
    target = logging.getLogger(name)
    message_filter = MessageFilter(*fragments)
    target.addFilter(message_filter)
    try:
        yield
    finally:
        target.removeFilter(message_filter)


import_bitsandbytes_quietly()
