"""trl-tip: on-policy distillation for TRL that trains only on the tokens that carry signal."""

from .attention import capture_last_attention_inputs, prompt_attention_mass
from .callbacks import HistoryEMACallback
from .config import TIPConfig
from .history import ModelHistory
from .loss import OutputHead, kept_token_jsd
from .selection import (
    AllTokens,
    EntropyDivergenceSample,
    EntropySample,
    EntropyTopK,
    Intersect,
    QuadrantSubset,
    RandomTokens,
    SelectionContext,
    SSToken,
    TokenSelector,
    TypeAware,
    Union,
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
    "HistoryEMACallback",
    "Intersect",
    "ModelHistory",
    "OutputHead",
    "QuadrantSubset",
    "RandomTokens",
    "SSToken",
    "SelectionContext",
    "TIPConfig",
    "TIPStatistics",
    "TIPTrainer",
    "TokenSelector",
    "TokenSignals",
    "TokenDumpCallback",
    "TypeAware",
    "Union",
    "build_selector",
    "capture_last_attention_inputs",
    "compute_token_signals",
    "kept_token_jsd",
    "metric_names",
    "prompt_attention_mass",
]
