"""trl-tip: on-policy distillation for TRL that trains only on the tokens that carry signal."""

from .config import TIPConfig
from .loss import OutputHead, kept_token_jsd
from .selection import (
    AllTokens,
    EntropyDivergenceSample,
    EntropySample,
    EntropyTopK,
    QuadrantSubset,
    RandomTokens,
    SelectionContext,
    TokenSelector,
    TypeAware,
    build_selector,
)
from .signals import TokenSignals, compute_token_signals
from .stats import TIPStatistics, metric_names
from .token_dump import TokenDumpCallback
from .trainer import TIPTrainer


__version__ = "0.1.0"

__all__ = [
    "AllTokens",
    "EntropyDivergenceSample",
    "EntropySample",
    "EntropyTopK",
    "OutputHead",
    "QuadrantSubset",
    "RandomTokens",
    "SelectionContext",
    "TIPConfig",
    "TIPStatistics",
    "TIPTrainer",
    "TokenSelector",
    "TokenSignals",
    "TokenDumpCallback",
    "TypeAware",
    "build_selector",
    "compute_token_signals",
    "kept_token_jsd",
    "metric_names",
]
