"""ssToken (Self-modulated and Semantic-aware Token selection): retrospective excess loss against a history model plus
prompt attention (last layer by default), top-k per sequence. Everything ssToken needs lives in this package, and it
plugs into trl-tip through the generic registries only: its options ([`SSTokenArguments`], mixed into the configs), its
rule with their checks and defaults (`selector.py`, in `trl_tip.selection.registry`), and the signal providers of its
per-token inputs (`providers.py`: the history model with its EMA updates, checkpoint and warm-up; the prompt
attention). `trl_tip/__init__.py` imports it before the configs are defined."""

from .attention import capture_attention_inputs, capture_last_attention_inputs, prompt_attention_mass
from .callback import HistoryEMACallback, SSTokenWarmupCallback
from .config import SSTokenArguments
from .history import HISTORY_DEVICES, HISTORY_MODES, ModelHistory, adapter_is_noop
from .providers import HISTORY_STATE_NAME, HistoryProvider, PromptAttentionProvider, history_model
from .selector import (
    DEFAULT_SSTOKEN_LOSS,
    PROMPT_ATTENTION,
    SSTOKEN_DEFAULTS,
    SSTOKEN_LOSSES,
    SSTOKEN_PAPER,
    SSToken,
    history_requirement,
    per_sequence_minmax,
    per_sequence_top_k,
    retrospective_excess_loss,
    sstoken_score,
)


__all__ = [
    "DEFAULT_SSTOKEN_LOSS",
    "HISTORY_DEVICES",
    "HISTORY_MODES",
    "HISTORY_STATE_NAME",
    "PROMPT_ATTENTION",
    "SSTOKEN_DEFAULTS",
    "SSTOKEN_LOSSES",
    "SSTOKEN_PAPER",
    "HistoryEMACallback",
    "HistoryProvider",
    "ModelHistory",
    "PromptAttentionProvider",
    "SSToken",
    "SSTokenArguments",
    "SSTokenWarmupCallback",
    "adapter_is_noop",
    "capture_attention_inputs",
    "capture_last_attention_inputs",
    "history_model",
    "history_requirement",
    "per_sequence_minmax",
    "per_sequence_top_k",
    "prompt_attention_mass",
    "retrospective_excess_loss",
    "sstoken_score",
]
