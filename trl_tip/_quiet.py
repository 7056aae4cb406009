"""Third-party messages that come from trl-tip's own imports and calls, not from the user's code, and how they are
silenced: narrowly, by logger and message, so that every other warning still reaches the user.

- bitsandbytes' CPU backend logs "Failed to load CPU gemm_4bit_forward from kernels-community: No module named
  'kernels'" when it is imported (trl-tip imports it through PEFT) on a CPU with AVX512-BF16 and the optional
  `kernels` package is missing; it then uses its own kernel. Dropped by [`install_import_filters`] (only that case:
  any other failure to load the kernel is still logged).
- TRL's "You are importing from 'trl.experimental'" warning when trl-tip imports `GKDTrainer`: see `_compat.py`.
- `GKDTrainer`'s "This GKD configuration ... is fully covered by `DistillationTrainer` ... Consider migrating" hint,
  when the trainer is a `TIPTrainer` (whose counterpart is `TIPDistillationTrainer`): see [`quiet_logger`].
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


__all__ = ["MessageFilter", "MissingKernelsFilter", "install_import_filters", "quiet_logger"]

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


class MessageFilter(logging.Filter):
    """Drops the log records whose message contains one of `fragments`."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


class MissingKernelsFilter(logging.Filter):
    """Drops bitsandbytes' import-time warning that the optional `kernels` package is not installed."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        missing_kernels = any(isinstance(a, ModuleNotFoundError) and a.name == "kernels" for a in args)
        return not (missing_kernels and "kernels-community" in str(record.msg))


def install_import_filters() -> None:
    """Installs the import-time filters (once); called when `trl_tip` is imported, before PEFT and bitsandbytes."""
    bnb_logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, MissingKernelsFilter) for f in bnb_logger.filters):
        bnb_logger.addFilter(MissingKernelsFilter())


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


install_import_filters()
