"""ssToken (Self-modulated and Semantic-aware Token selection): retrospective excess loss against a history model plus
prompt attention (last layer by default), top-k per sequence. Everything ssToken needs lives in this package: the
selector and its score ([`SSToken`]), the history model ([`ModelHistory`]), the attention score, the EMA and warm-up
callbacks, and the rule's registration with its options and defaults."""

from .attention import capture_attention_inputs, capture_last_attention_inputs, prompt_attention_mass
from .callback import HistoryEMACallback, SSTokenWarmupCallback
from .history import HISTORY_DEVICES, HISTORY_MODES, ModelHistory, adapter_is_noop
from .selector import (
    DEFAULT_SSTOKEN_LOSS,
    PROMPT_ATTENTION,
    SSTOKEN_DEFAULTS,
    SSTOKEN_LOSSES,
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
    "PROMPT_ATTENTION",
    "SSTOKEN_DEFAULTS",
    "SSTOKEN_LOSSES",
    "HistoryEMACallback",
    "ModelHistory",
    "SSToken",
    "SSTokenWarmupCallback",
    "adapter_is_noop",
    "capture_attention_inputs",
    "capture_last_attention_inputs",
    "history_requirement",
    "per_sequence_minmax",
    "per_sequence_top_k",
    "prompt_attention_mass",
    "retrospective_excess_loss",
    "sstoken_score",
]
