"""ssToken selection: retrospective excess loss against a history model plus prompt attention, top-k per sequence.

The pure tensor functions (per-sequence min–max normalisation, the combined score, per-sequence top-k) are tested in
isolation; [`SSToken`] puts them together as a selector. It reads two per-token inputs that the trainer computes only
because the selector asks for them in `requires`: the history model's per-token loss (`history_nll` or
`history_divergence`) and the prompt attention mass (`prompt_attention`), both passed in `SelectionContext.extras`.
`trl_tip.Intersect` and `trl_tip.Union` combine it with any other selector (e.g. a quadrant rule). Its attention-only
warm-up is a [`SelectionScheduleCallback`] phase that uses [`SSToken.attention_only`].
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable

import torch

from ..selection.base import SelectionContext
from ..selection.budget import (
    dense_ids,
    group_counts,
    group_quotas,
    grouped_top_k,
    planned_budget,
    scoped_top_k,
)
from ..selection.registry import check_option
from ..selection.rules import check_keep_ratio
from ..signals import TokenSignals


__all__ = [
    "DEFAULT_SSTOKEN_LOSS",
    "PROMPT_ATTENTION",
    "SSTOKEN_DEFAULTS",
    "SSTOKEN_LOSSES",
    "SSTOKEN_PAPER",
    "SSToken",
    "history_requirement",
    "per_sequence_minmax",
    "per_sequence_top_k",
    "retrospective_excess_loss",
    "sstoken_score",
]

SSTOKEN_LOSSES = ("nll", "divergence")
DEFAULT_SSTOKEN_LOSS = "nll"  # the paper's REL; on the quality benchmark "divergence" collapsed the student
PROMPT_ATTENTION = "prompt_attention"

# The paper a model card credits when the rule is used (`trl_tip.model_card.rule_papers` reads `SSToken.paper`).
SSTOKEN_PAPER = {
    "name": "ssToken",
    "title": "ssToken: Self-modulated and Semantic-aware Token Selection for LLM Fine-tuning",
    "id": "2510.18250",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @misc{qin2025sstoken,
            title        = {{ssToken: Self-modulated and Semantic-aware Token Selection for LLM Fine-tuning}},
            author       = {Xiaohan Qin and Xiaoxing Wang and Ning Liao and Cancheng Zhang and Xiangdong Zhang and Mingquan Feng and Jingzhi Wang and Junchi Yan},
            year         = 2025,
            eprint       = {2510.18250},
            archivePrefix = {arXiv},
            primaryClass = {cs.AI},
            url          = {https://arxiv.org/abs/2510.18250},
        }"""),
}


def history_requirement(loss: str) -> str:
    """Name of the extra signal holding the history model's per-token loss of kind `loss` (`nll` or `divergence`)."""
    if loss not in SSTOKEN_LOSSES:
        raise ValueError(f"sstoken_loss={loss!r} is unknown; allowed values: {', '.join(SSTOKEN_LOSSES)}.")
    return f"history_{loss}"


def retrospective_excess_loss(history_loss: torch.Tensor, current_loss: torch.Tensor) -> torch.Tensor:
    """REL = L_his − L_cur: positive where the current model does better than the history model on the token.

    Args:
        history_loss (`torch.Tensor`): Per-token loss of the history model, shape `(N,)`.
        current_loss (`torch.Tensor`): Per-token loss of the current model, shape `(N,)`.

    Returns:
        `torch.Tensor`: Float32 tensor of shape `(N,)`.
    """
    if history_loss.shape != current_loss.shape:
        raise ValueError(
            f"history_loss and current_loss must have the same shape, got {tuple(history_loss.shape)} and "
            f"{tuple(current_loss.shape)}."
        )
    return history_loss.float() - current_loss.float()


def per_sequence_minmax(
    values: torch.Tensor, seq_idx: torch.Tensor, valid: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """Min–max normalises `values` within each sequence, as ssToken's reference code: `(v − min) / (max − min + eps)`.

    A sequence whose valid values are all equal maps to 0; invalid positions (and non-finite values) map to 0 and do
    not enter the min and max.

    Args:
        values (`torch.Tensor`): Values of shape `(N,)`.
        seq_idx (`torch.Tensor`): Sequence of each position, shape `(N,)`, non-negative integers.
        valid (`torch.Tensor`, *optional*): Boolean mask of the positions to normalise (all finite ones if `None`).
        eps (`float`, *optional*, defaults to `1e-8`): Added to the span (the reference code's `1e-8`).

    Returns:
        `torch.Tensor`: Float32 tensor of shape `(N,)` in `[0, 1)`.
    """
    values = values.float()
    ok = torch.isfinite(values) if valid is None else valid & torch.isfinite(values)
    if values.numel() == 0:
        return values.clone()
    num_seq = int(seq_idx.max()) + 1
    seq_idx = seq_idx.long()
    low = torch.full((num_seq,), float("inf"), device=values.device)
    high = torch.full((num_seq,), float("-inf"), device=values.device)
    low = low.scatter_reduce(0, seq_idx[ok], values[ok], reduce="amin")
    high = high.scatter_reduce(0, seq_idx[ok], values[ok], reduce="amax")
    span = (high - low)[seq_idx]
    shifted = values - low[seq_idx]
    out = torch.where(torch.isfinite(span), shifted / (span + eps), torch.zeros_like(values))
    return torch.where(ok, out, torch.zeros_like(out))


def sstoken_score(rel_norm: torch.Tensor | None, attention: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """score = gamma * REL_norm + (1 - gamma) * attention; a term with weight 0 may be `None`.

    Args:
        rel_norm (`torch.Tensor`, *optional*): Normalised REL, shape `(N,)`; needed when `gamma > 0`.
        attention (`torch.Tensor`, *optional*): Prompt attention mass, shape `(N,)`; needed when `gamma < 1`.
        gamma (`float`): Weight of the REL term, in `[0, 1]`.

    Returns:
        `torch.Tensor`: Float32 score of shape `(N,)`.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}.")
    if gamma > 0 and rel_norm is None:
        raise ValueError(f"gamma={gamma} > 0 needs the normalised REL.")
    if gamma < 1 and attention is None:
        raise ValueError(f"gamma={gamma} < 1 needs the prompt attention.")
    score = None
    if gamma > 0:
        score = gamma * rel_norm.float()
    if gamma < 1:
        term = (1.0 - gamma) * attention.float()
        score = term if score is None else score + term
    return score


def per_sequence_top_k(
    scores: torch.Tensor, seq_idx: torch.Tensor, keep_ratio: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Keeps the `keep_ratio` highest-scored valid positions of each sequence: `⌈keep_ratio · n⌉` of its `n`.

    ssToken's budget (`k = ceil(resp_len * data_prop)` in its reference code); equal scores go to the lower index.

    Args:
        scores (`torch.Tensor`): Scores of shape `(N,)`.
        seq_idx (`torch.Tensor`): Sequence of each position, shape `(N,)`.
        keep_ratio (`float`): Kept share per sequence, in `(0, 1]`.
        valid (`torch.Tensor`, *optional*): Boolean mask of the candidate positions (all if `None`).

    Returns:
        `torch.Tensor`: Boolean keep-mask of shape `(N,)`.
    """
    keep_ratio = check_keep_ratio(keep_ratio)
    n = scores.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=scores.device)
    valid = torch.ones(n, dtype=torch.bool, device=scores.device) if valid is None else valid
    groups = dense_ids(seq_idx.long().to(scores.device))
    counts = group_counts(groups, valid, n)
    return grouped_top_k(scores, groups, group_quotas(counts, keep_ratio, "ceil"), valid)


class SSToken:
    """ssToken: keep the top `keep_ratio` tokens of each sequence by `gamma * REL_norm + (1 - gamma) * attention`.

    REL is the retrospective excess loss `L_his − L_cur` of each token (history model minus current student),
    min–max normalised per sequence; `attention` is the attention mass the token puts on the prompt in one layer of the
    student (the last by default), averaged over heads. With `loss="nll"` the per-token loss is the negative
    log-likelihood of the sampled token (the paper's); with `loss="divergence"` it is the token's distillation loss to
    the teacher (the generalized JSD with the trainer's `beta`). Each sequence keeps `⌈keep_ratio · n⌉` of its `n`
    tokens (`budget_scope="rollout"`, the paper's) or the process's micro-batch keeps `keep_ratio · N` rounded half
    up (`budget_scope="batch"`); `score_order="lowest"` keeps the lowest scores instead.

    The attention-only warm-up of the paper is a separate phase: [`attention_only`] returns a view of this selector
    that scores by the attention alone, which a [`SelectionScheduleCallback`] uses for the first steps (`TIPTrainer`
    adds one for `sstoken_warmup_ratio` / `sstoken_warmup_steps`).

    The selector declares in `requires` which extra per-token inputs it reads from `SelectionContext.extras`;
    `TIPTrainer` computes only those. It also accumulates its own `sstoken/...` metrics while `context.training`.

    Args:
        keep_ratio (`float`, *optional*, defaults to `0.6`): Kept share of each sequence's tokens, in `(0, 1]`.
        gamma (`float`, *optional*, defaults to `0.5`): Weight of REL; `1` is REL only, `0` attention only.
        loss (`str`, *optional*, defaults to `"nll"`): Per-token loss of REL, `"nll"` or `"divergence"`.
        budget_scope (`str`, *optional*, defaults to `"rollout"`): `"rollout"` (per sequence) or `"batch"`.
        score_order (`str`, *optional*, defaults to `"highest"`): `"highest"` or `"lowest"`.
    """

    paper = SSTOKEN_PAPER

    def __init__(
        self,
        keep_ratio: float = 0.6,
        gamma: float = 0.5,
        loss: str = DEFAULT_SSTOKEN_LOSS,
        budget_scope: str = "rollout",
        score_order: str = "highest",
    ):
        # The registry's checks (the same ones TIPConfig runs on sstoken_gamma, budget_scope and score_order).
        check_option("sstoken_gamma", gamma)
        check_option("budget_scope", budget_scope)
        check_option("score_order", score_order)
        self.keep_ratio = check_keep_ratio(keep_ratio)
        self.gamma = float(gamma)
        self.loss = loss
        self.budget_scope = budget_scope
        self.score_order = score_order
        self.requires = self._requirements(self.gamma)
        self.reset_metrics()

    def _requirements(self, gamma: float) -> frozenset[str]:
        requires = set()
        if gamma > 0:
            requires.add(history_requirement(self.loss))
        if gamma < 1:
            requires.add(PROMPT_ATTENTION)
        return frozenset(requires)

    def attention_only(self) -> _AttentionOnly:
        """This selector scoring by the prompt attention alone (`gamma = 0`): the warm-up phase.

        The view shares everything else with this selector (keep ratio, budget, metrics, checkpoint state) and
        requires only `prompt_attention`, so no history forward runs while it is in use.
        """
        return _AttentionOnly(self)

    def planned_kept(self, lengths: torch.Tensor) -> torch.Tensor:
        """Loss denominator of sequences of `lengths` tokens: `⌈keep_ratio · n⌉` each (`keep_ratio · n` per batch)."""
        return planned_budget(lengths, self.keep_ratio, self.budget_scope, rollout_rounding="ceil")

    # -------------------------------------------------------------- selection

    def current_loss(self, signals: TokenSignals) -> torch.Tensor:
        """The current student's per-token loss of the kind REL uses."""
        return -signals.student_log_prob if self.loss == "nll" else signals.loss

    def __call__(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        return self._select(signals, context, self.gamma)

    def _select(self, signals: TokenSignals, context: SelectionContext, gamma: float) -> torch.Tensor:
        extras = context.extras
        missing = sorted(name for name in self._requirements(gamma) if name not in extras)
        if missing:
            raise ValueError(
                f"{self!r} needs the extra signals {', '.join(missing)} in SelectionContext.extras; TIPTrainer "
                "computes what a selector lists in `requires`."
            )
        finite = signals.finite
        rel = rel_norm = attention = None
        if gamma > 0:
            rel = retrospective_excess_loss(extras[history_requirement(self.loss)], self.current_loss(signals))
            rel_norm = per_sequence_minmax(rel, signals.seq_idx, finite)
        if gamma < 1:
            attention = extras[PROMPT_ATTENTION].float()
        score = sstoken_score(rel_norm, attention, gamma)
        valid = finite & torch.isfinite(score)
        score = torch.where(valid, score, torch.zeros_like(score))
        keep = scoped_top_k(score, signals, self.keep_ratio, self.budget_scope, self.score_order, "ceil", valid)
        if context.training:
            self._accumulate(rel, attention, keep, context.quadrant, valid)
        return keep

    # -------------------------------------------------------------- metrics

    def reset_metrics(self) -> None:
        """Forgets the sums accumulated since the last logging step."""
        # rel_sum, rel_count, attn_sum, attn_count, kept, kept_q3
        self._sums = torch.zeros(6, dtype=torch.float64)

    @torch.no_grad()
    def _accumulate(self, rel, attention, keep, quadrant, valid) -> None:
        sums = torch.zeros(6, dtype=torch.float64, device=keep.device)
        if rel is not None:
            ok = valid & torch.isfinite(rel)
            sums[0], sums[1] = rel[ok].double().sum(), ok.sum()
        if attention is not None:
            ok = valid & torch.isfinite(attention)
            sums[2], sums[3] = attention[ok].double().sum(), ok.sum()
        sums[4] = keep.sum()
        sums[5] = (keep & (quadrant.to(keep.device) == 3)).sum()
        if self._sums.device != sums.device:
            self._sums = self._sums.to(sums.device)
        self._sums += sums

    def compute_metrics(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """The `sstoken/...` metrics since the last call, summed over processes with `reduce_sum`, then reset.

        Token means weight every token of every step and process equally. A mean over no token is not reported
        (e.g. `sstoken/rel_mean` with `gamma=0`).

        Returns:
            `dict[str, float]`: `sstoken/rel_mean` (raw REL), `sstoken/attn_mean`, `sstoken/overlap_q3` (share of the
            tokens ssToken kept that are Q3).
        """
        sums = self._sums if reduce_sum is None else reduce_sum(self._sums)
        rel_sum, rel_n, attn_sum, attn_n, kept, kept_q3 = sums.double().cpu().tolist()
        metrics = {}
        if rel_n > 0:
            metrics["sstoken/rel_mean"] = rel_sum / rel_n
        if attn_n > 0:
            metrics["sstoken/attn_mean"] = attn_sum / attn_n
        metrics["sstoken/overlap_q3"] = kept_q3 / kept if kept > 0 else 0.0
        self.reset_metrics()
        return metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Metric sums not yet logged (saved in checkpoints so that a resumed run logs the same values)."""
        return {"sums": self._sums.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores what [`state_dict`] returned."""
        self._sums = state["sums"].to(torch.float64)

    def __repr__(self) -> str:
        return (
            f"SSToken(keep_ratio={self.keep_ratio}, gamma={self.gamma}, loss={self.loss!r}, "
            f"budget_scope={self.budget_scope!r}, score_order={self.score_order!r})"
        )


class _AttentionOnly:
    """[`SSToken.attention_only`]: the same selector scoring by the prompt attention alone (ssToken's warm-up)."""

    def __init__(self, base: SSToken):
        self.base = base
        self.requires = frozenset({PROMPT_ATTENTION})

    @property
    def keep_ratio(self) -> float:
        return self.base.keep_ratio

    def __call__(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        return self.base._select(signals, context, 0.0)

    def planned_kept(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.base.planned_kept(lengths)

    def compute_metrics(self, reduce_sum=None) -> dict[str, float]:
        return self.base.compute_metrics(reduce_sum)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.base.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.base.load_state_dict(state)

    def __repr__(self) -> str:
        return f"{self.base!r}.attention_only()"


# ---------------------------------------------------------------------------------------------------- registry

# Defaults of the `sstoken_*` options, applied when token_selection="sstoken" (they must stay unset otherwise), and by
# `TIPTrainer` for a custom selector that needs a history model.
SSTOKEN_DEFAULTS = {
    "sstoken_gamma": 0.5,
    "sstoken_loss": DEFAULT_SSTOKEN_LOSS,
    "sstoken_history": "fixed",
    "sstoken_ema_decay": 0.9,
    "sstoken_ema_update_interval": 1,
    "sstoken_history_device": "same",
    "sstoken_warmup_ratio": 0.2,
    "sstoken_warmup_steps": None,
    "sstoken_attention_layer": -1,
}
_HISTORY_OPTIONS = ("sstoken_loss", "sstoken_history", "sstoken_ema_decay", "sstoken_ema_update_interval")
_HISTORY_OPTIONS += ("sstoken_history_device",)
_WARMUP_OPTIONS = ("sstoken_warmup_ratio", "sstoken_warmup_steps")


def _integer(name: str, low: int | None):
    def check(value) -> str | None:
        if int(value) != value or (low is not None and value < low):
            return f"{name} must be an integer{'' if low is None else f' >= {low}'}, got {value}."
        return None

    return check


def _validate_sstoken(args, given: frozenset[str]) -> None:
    """Cross-option checks of the `sstoken` rule; drops the options its configuration does not read."""
    # The history provider refuses an explicit sstoken_history_device that a LoRA student's base-model history
    # cannot use (known only with the model); it reads which options were given from here.
    args._sstoken_given_options = given
    if "sstoken_warmup_steps" in given and "sstoken_warmup_ratio" in given:
        raise ValueError(
            f"Give sstoken_warmup_ratio or sstoken_warmup_steps, not both; got sstoken_warmup_ratio="
            f"{args.sstoken_warmup_ratio} and sstoken_warmup_steps={args.sstoken_warmup_steps}."
        )
    if "sstoken_warmup_steps" in given:
        args.sstoken_warmup_ratio = None
    if args.sstoken_gamma == 0.0:
        # Attention only: no history model and nothing to warm up, so their options would be silently ignored.
        unused = [name for name in (*_HISTORY_OPTIONS, *_WARMUP_OPTIONS) if name in given]
        if unused:
            raise ValueError(
                f"{', '.join(unused)} are not used with sstoken_gamma=0 (attention only: no history model, no "
                "warm-up); leave them unset or set sstoken_gamma > 0."
            )
        for name in (*_HISTORY_OPTIONS, *_WARMUP_OPTIONS):
            setattr(args, name, None)
        return
    if args.sstoken_gamma == 1.0 and args.sstoken_attention_layer is not None:
        warmup = args.sstoken_warmup_steps or args.sstoken_warmup_ratio
        if not warmup and "sstoken_attention_layer" in given:
            raise ValueError(
                "sstoken_attention_layer is not used with sstoken_gamma=1 and no warm-up (REL only: no attention "
                "score); leave it unset, or set sstoken_gamma < 1 or a warm-up."
            )
        if not warmup:
            args.sstoken_attention_layer = None
    if args.sstoken_history == "fixed":
        unused = [name for name in ("sstoken_ema_decay", "sstoken_ema_update_interval") if name in given]
        if unused:
            raise ValueError(
                f"{', '.join(unused)} are not used with sstoken_history='fixed'; leave them unset or use "
                "sstoken_history='ema'."
            )
        args.sstoken_ema_decay = args.sstoken_ema_update_interval = None


def _register() -> None:
    from ..selection.registry import OptionSpec, RuleSpec, one_of, register_option, register_rule
    from .history import HISTORY_DEVICES, HISTORY_MODES

    def gamma_check(value):
        return None if 0.0 <= value <= 1.0 else f"sstoken_gamma must be in [0, 1], got {value}."

    def decay_check(value):
        return None if 0.0 <= value < 1.0 else f"sstoken_ema_decay must be in [0, 1), got {value}."

    def warmup_ratio_check(value):
        return None if 0.0 <= value < 1.0 else f"sstoken_warmup_ratio must be in [0, 1), got {value}."

    register_option(OptionSpec("sstoken_gamma", SSTOKEN_DEFAULTS["sstoken_gamma"], gamma_check))
    register_option(
        OptionSpec("sstoken_loss", SSTOKEN_DEFAULTS["sstoken_loss"], one_of("sstoken_loss", SSTOKEN_LOSSES))
    )
    register_option(
        OptionSpec("sstoken_history", SSTOKEN_DEFAULTS["sstoken_history"], one_of("sstoken_history", HISTORY_MODES))
    )
    register_option(OptionSpec("sstoken_ema_decay", SSTOKEN_DEFAULTS["sstoken_ema_decay"], decay_check))
    register_option(
        OptionSpec(
            "sstoken_ema_update_interval",
            SSTOKEN_DEFAULTS["sstoken_ema_update_interval"],
            _integer("sstoken_ema_update_interval", 1),
        )
    )
    register_option(
        OptionSpec(
            "sstoken_history_device",
            SSTOKEN_DEFAULTS["sstoken_history_device"],
            one_of("sstoken_history_device", HISTORY_DEVICES),
        )
    )
    register_option(OptionSpec("sstoken_warmup_ratio", SSTOKEN_DEFAULTS["sstoken_warmup_ratio"], warmup_ratio_check))
    register_option(OptionSpec("sstoken_warmup_steps", None, _integer("sstoken_warmup_steps", 0)))
    register_option(
        OptionSpec(
            "sstoken_attention_layer",
            SSTOKEN_DEFAULTS["sstoken_attention_layer"],
            _integer("sstoken_attention_layer", None),
        )
    )
    register_rule(
        RuleSpec(
            "sstoken",
            lambda args: SSToken(
                args.keep_ratio,
                gamma=args.sstoken_gamma,
                loss=args.sstoken_loss or DEFAULT_SSTOKEN_LOSS,
                budget_scope=args.budget_scope,
                score_order=args.score_order,
            ),
            budgeted=True,
            default_keep_ratio=0.6,
            options=(*SSTOKEN_DEFAULTS, "budget_scope", "score_order"),
            defaults={"budget_scope": "rollout"},
            summary="ssToken: gamma * REL_norm + (1 - gamma) * prompt attention, top keep_ratio per sequence",
            source="ssToken (ICLR 2026)",
            validate=_validate_sstoken,
        )
    )


_register()
