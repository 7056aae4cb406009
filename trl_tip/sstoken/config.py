"""ssToken's config options, in one dataclass that `TIPConfig` and `TIPDistillationConfig` inherit (registered with
`trl_tip.plugins.register_arguments`). Each option is `None` unless given; config validation checks it against the
`sstoken` rule's registry entry (`selector.py`) and fills in its default."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..plugins import register_arguments


__all__ = ["SSTokenArguments"]


@register_arguments
@dataclass
class SSTokenArguments:
    r"""
    The options of the `sstoken` rule (leave them unset for other rules).

    Parameters:
        > Parameters of the `sstoken` rule (leave unset for other rules)

        sstoken_gamma (`float`, *optional*):
            Default `0.5`: weight of the retrospective excess loss in `gamma * REL_norm + (1 - gamma) * attention`;
            `1` is REL only, `0` attention only (no history model).
        sstoken_loss (`str`, *optional*):
            Default `"nll"`: per-token loss of REL, `"nll"` (of the sampled token, the paper's definition) or
            `"divergence"` (the token's distillation loss to the teacher).
        sstoken_history (`str`, *optional*):
            Default `"fixed"`: history model, `"fixed"` (the student before training, as in the paper: for a LoRA
            student its base model with the adapter disabled, no copy; for a full student a frozen copy) or `"ema"`
            (an EMA of the student's trainable weights).
        sstoken_ema_decay (`float`, *optional*):
            With `ema` history (default `0.9`, trl-tip's choice): decay `alpha` of `θ_his ← alpha θ_his + (1 − alpha) θ`.
        sstoken_ema_update_interval (`int`, *optional*):
            With `ema` history (default `1`): optimizer steps between EMA updates.
        sstoken_history_device (`str`, *optional*):
            Default `"same"`: where a history copy lives, `"same"` (the student's device) or `"cpu"`.
        sstoken_warmup_ratio (`float`, *optional*):
            Default `0.2` (the paper's ~20%): share of `max_steps` at the start of training that selects by the
            attention score alone, in `[0, 1)`. Give it or `sstoken_warmup_steps`, not both.
        sstoken_warmup_steps (`int`, *optional*):
            First optimizer steps that select by the attention score alone (instead of `sstoken_warmup_ratio`).
        sstoken_attention_layer (`int`, *optional*):
            Default `-1` (the last): decoder layer whose attention gives the semantic score; Python indexing.
    """

    sstoken_gamma: float | None = field(
        default=None,
        metadata={
            "help": "sstoken only (default 0.5): weight of the retrospective excess loss in gamma * REL_norm + "
            "(1 - gamma) * prompt attention, in [0, 1]; 1 = REL only, 0 = attention only (no history model)."
        },
    )
    sstoken_loss: str | None = field(
        default=None,
        metadata={
            "help": "sstoken only (default `nll`): per-token loss of REL, `nll` (of the sampled token, the paper's "
            "definition) or `divergence` (the token's distillation loss to the teacher).",
        },
    )
    sstoken_history: str | None = field(
        default=None,
        metadata={
            "help": "sstoken only (default `fixed`): history model, `fixed` (the student before training: a LoRA "
            "student's base model with the adapter disabled, or a frozen copy) or `ema` (EMA of the trainable weights).",
        },
    )
    sstoken_ema_decay: float | None = field(
        default=None,
        metadata={"help": "sstoken with ema history (default 0.9): EMA decay alpha in [0, 1)."},
    )
    sstoken_ema_update_interval: int | None = field(
        default=None,
        metadata={"help": "sstoken with ema history (default 1): optimizer steps between EMA updates (>= 1)."},
    )
    sstoken_history_device: str | None = field(
        default=None,
        metadata={"help": "sstoken (default `same`): where a history copy lives, `same` (student's device) or `cpu`."},
    )
    sstoken_warmup_ratio: float | None = field(
        default=None,
        metadata={
            "help": "sstoken (default 0.2): share of max_steps at the start that selects by the attention score "
            "alone, in [0, 1). Give it or sstoken_warmup_steps, not both."
        },
    )
    sstoken_warmup_steps: int | None = field(
        default=None,
        metadata={
            "help": "sstoken: first optimizer steps that select by the attention score alone (instead of "
            "sstoken_warmup_ratio)."
        },
    )
    sstoken_attention_layer: int | None = field(
        default=None,
        metadata={
            "help": "sstoken (default -1, the last): decoder layer whose prompt attention is the semantic score "
            "(Python indexing)."
        },
    )
