"""trl-tip: on-policy distillation for TRL that trains only on the tokens that carry signal."""

# First `_quiet` (imports bitsandbytes without its kernel-fetch notices, before PEFT does), then the plug-ins, before the
# configs are defined: a plug-in registers its rule, its signal providers and its config arguments (peft's pattern).
from . import _quiet, sstoken  # noqa: F401
from .callbacks import SelectionCallback, SelectionScheduleCallback, linear_keep_ratio
from .config import TIPArguments, TIPConfig, TIPDistillationConfig
from .engine import SelectionRecord, StepTokens, TokenBatch, TokenSelectionEngine
from .loss import OutputHead, compute_token_signals, kept_token_jsd
from .selection import (
    AllTokens,
    DivergenceTopK,
    EntropyDivergenceSample,
    EntropySample,
    EntropyTopK,
    Intersect,
    Q3Score,
    QuadrantBudget,
    QuadrantSubset,
    RandomTokens,
    SelectionContext,
    SoftOR,
    TokenSelector,
    Union,
    build_selector,
)
from .signals import TokenSignals
from .sstoken import (
    HistoryEMACallback,
    ModelHistory,
    SSToken,
    SSTokenWarmupCallback,
    capture_attention_inputs,
    capture_last_attention_inputs,
    prompt_attention_mass,
)
from .stats import TIPStatistics, metric_names
from .token_dump import TokenDumpCallback
from .trainers import TIPDistillationTrainer, TIPTrainer


__version__ = "0.2.0"

__all__ = [
    "AllTokens",
    "DivergenceTopK",
    "EntropyDivergenceSample",
    "EntropySample",
    "EntropyTopK",
    "HistoryEMACallback",
    "Intersect",
    "ModelHistory",
    "OutputHead",
    "Q3Score",
    "QuadrantBudget",
    "QuadrantSubset",
    "RandomTokens",
    "SSToken",
    "SSTokenWarmupCallback",
    "SelectionCallback",
    "SelectionContext",
    "SelectionRecord",
    "SelectionScheduleCallback",
    "SoftOR",
    "StepTokens",
    "TIPArguments",
    "TIPConfig",
    "TIPDistillationConfig",
    "TIPDistillationTrainer",
    "TIPStatistics",
    "TIPTrainer",
    "TokenBatch",
    "TokenDumpCallback",
    "TokenSelectionEngine",
    "TokenSelector",
    "TokenSignals",
    "Union",
    "build_selector",
    "capture_attention_inputs",
    "capture_last_attention_inputs",
    "compute_token_signals",
    "kept_token_jsd",
    "linear_keep_ratio",
    "metric_names",
    "prompt_attention_mass",
]
