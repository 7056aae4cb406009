"""The TIP paper's score rules: Soft-OR (`tip`, Eq. 7–8), the Q3 score (Section 7.3) and divergence top-k (Table 8).

Each ranks the finite eligible tokens by a score and keeps the top `⌊ρ·m⌋` of each rollout of `m` tokens
(`budget_scope="rollout"`, the paper's) or the top `ρ·N` of the process's micro-batch (`budget_scope="batch"`);
`score_order="lowest"` keeps the bottom instead (the paper's Table 6 control is Soft-OR's bottom 50%). Equal scores go
to the earlier position. The normalised axes are those of [`normalize`]: `ĥ` is the entropy clipped at the
`entropy_clip_quantile` (0.98) of the micro-batch's finite tokens over all processes, then min–max normalised; `δ̂` is
the min–max normalised divergence over the same tokens.
"""

from __future__ import annotations

import torch

from ..signals import TokenSignals
from .base import SelectionContext
from .budget import planned_budget, scoped_top_k
from .normalize import fit_minmax, gather_finite
from .registry import RuleSpec, check_option, register_rule
from .rules import check_keep_ratio


__all__ = ["DivergenceTopK", "Q3Score", "SoftOR", "normalized_entropy_and_divergence"]


def _check_clip(entropy_clip_quantile: float) -> float:
    return float(check_option("entropy_clip_quantile", entropy_clip_quantile))


def normalized_entropy_and_divergence(
    signals: TokenSignals, context: SelectionContext, entropy_clip_quantile: float = 0.98, divergence: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`ĥ` and `δ̂` of every position (float64, 0 at non-finite positions), normalised over all processes.

    Args:
        signals ([`TokenSignals`]): The micro-batch.
        context ([`SelectionContext`]): Its context (for `gather`).
        entropy_clip_quantile (`float`, *optional*, defaults to `0.98`): Quantile the entropy is clipped at before the
            min–max (`1` clips nothing).
        divergence (`bool`, *optional*, defaults to `True`): Also normalise the divergence (else `δ̂` is `None`).

    Returns:
        `tuple`: `(ĥ, δ̂)`. An axis whose finite values are all equal maps to 0 everywhere.
    """
    columns = [signals.entropy, signals.divergence] if divergence else [signals.entropy]
    gathered = gather_finite(columns, signals.finite, context.gather)
    entropy_map = fit_minmax(gathered[:, 0], entropy_clip_quantile)
    h_hat = entropy_map(signals.entropy, signals.finite)
    if not divergence:
        return h_hat, None
    d_hat = fit_minmax(gathered[:, 1])(signals.divergence, signals.finite)
    return h_hat, d_hat


class _ScoreRule:
    """A rule that keeps the top (or bottom) `keep_ratio` of the tokens by a score, per rollout or per batch."""

    def __init__(self, keep_ratio: float, budget_scope: str = "rollout", score_order: str = "highest"):
        self.keep_ratio = check_keep_ratio(keep_ratio)
        self.budget_scope = check_option("budget_scope", budget_scope)
        self.score_order = check_option("score_order", score_order)

    def scores(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def planned_kept(self, lengths: torch.Tensor) -> torch.Tensor:
        """Loss denominator of rollouts of `lengths` tokens: `⌊keep_ratio · m⌋` each (`keep_ratio · m` per batch)."""
        return planned_budget(lengths, self.keep_ratio, self.budget_scope)

    def __call__(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        return scoped_top_k(
            self.scores(signals, context), signals, self.keep_ratio, self.budget_scope, self.score_order
        )

    def _repr_options(self) -> str:
        return f"keep_ratio={self.keep_ratio}, budget_scope={self.budget_scope!r}, score_order={self.score_order!r}"


class SoftOR(_ScoreRule):
    """TIP's type-aware rule, Soft-OR (Eq. 7–8): `s = ĥ + δ̂ − ĥ·δ̂ = 1 − (1 − ĥ)(1 − δ̂)`, top `⌊ρ·m⌋` per rollout.

    A token scores high when it is uncertain (high `ĥ`) or when the teacher disagrees (high `δ̂`), and highest when
    both. `token_selection="tip"`.

    Args:
        keep_ratio (`float`, *optional*, defaults to `0.5`): `ρ`, in `(0, 1]` (the paper uses 0.5 and 0.2).
        budget_scope (`str`, *optional*, defaults to `"rollout"`): `"rollout"` or `"batch"`.
        score_order (`str`, *optional*, defaults to `"highest"`): `"lowest"` keeps the bottom (Table 6 control).
        entropy_clip_quantile (`float`, *optional*, defaults to `0.98`): Quantile the entropy is clipped at.
    """

    def __init__(
        self,
        keep_ratio: float = 0.5,
        budget_scope: str = "rollout",
        score_order: str = "highest",
        entropy_clip_quantile: float = 0.98,
    ):
        super().__init__(keep_ratio, budget_scope, score_order)
        self.entropy_clip_quantile = _check_clip(entropy_clip_quantile)

    def scores(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        """The Soft-OR score of each position (float64, in `[0, 1]`)."""
        h_hat, d_hat = normalized_entropy_and_divergence(signals, context, self.entropy_clip_quantile)
        # The same as ĥ + δ̂ − ĥ·δ̂, but exactly 1 where either axis is 1 (no rounding breaks ties at the top).
        return 1.0 - (1.0 - h_hat) * (1.0 - d_hat)

    def __repr__(self) -> str:
        return f"SoftOR({self._repr_options()}, entropy_clip_quantile={self.entropy_clip_quantile})"


class Q3Score(_ScoreRule):
    """TIP's Q3-only rule (Section 7.3, Table 4): rank by `w = KL(P_T ‖ P_S) · (1 − ĥ)`, keep the top `ρ`.

    Overconfident tokens (low entropy) where the teacher disagrees rank first. The forward KL is used only to rank
    (requested from the same chunked pass as the other signals, `requires={"forward_kl"}`); the training loss on the
    kept tokens stays the trainer's (`beta=1` for the paper's reverse KL). `token_selection="q3_score"`.

    Args:
        keep_ratio (`float`, *optional*, defaults to `0.1`): `ρ` (the paper uses 0.1 and 0.2).
        budget_scope (`str`, *optional*, defaults to `"rollout"`): `"rollout"` or `"batch"`.
        score_order (`str`, *optional*, defaults to `"highest"`): `"lowest"` keeps the bottom.
        entropy_clip_quantile (`float`, *optional*, defaults to `0.98`): Quantile the entropy is clipped at.
    """

    requires = frozenset({"forward_kl"})

    def __init__(
        self,
        keep_ratio: float = 0.1,
        budget_scope: str = "rollout",
        score_order: str = "highest",
        entropy_clip_quantile: float = 0.98,
    ):
        super().__init__(keep_ratio, budget_scope, score_order)
        self.entropy_clip_quantile = _check_clip(entropy_clip_quantile)

    def scores(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        """The Q3 score of each position (float64, `>= 0` up to rounding; 0 at non-finite positions)."""
        if "forward_kl" not in context.extras:
            raise ValueError(
                f"{self!r} needs the extra signal forward_kl in SelectionContext.extras; the trainer computes what a "
                "selector lists in `requires`."
            )
        h_hat, _ = normalized_entropy_and_divergence(signals, context, self.entropy_clip_quantile, divergence=False)
        forward_kl = context.extras["forward_kl"].to(h_hat.device).double()
        forward_kl = torch.where(signals.finite, forward_kl, torch.zeros_like(forward_kl))
        return forward_kl * (1.0 - h_hat)

    def __repr__(self) -> str:
        return f"Q3Score({self._repr_options()}, entropy_clip_quantile={self.entropy_clip_quantile})"


class DivergenceTopK(_ScoreRule):
    """TIP's divergence-only ablation (Table 8, Appendix B.2): the top `ρ` by `δ̂`.

    Min–max normalisation does not change an order, so the tokens are ranked by the divergence `D` itself (the axis
    chosen by `TIPConfig.divergence`; the per-token loss by default). `token_selection="divergence_topk"`.

    Args:
        keep_ratio (`float`, *optional*, defaults to `0.1`): `ρ` (the paper compares it at Q3's budget).
        budget_scope (`str`, *optional*, defaults to `"rollout"`): `"rollout"` or `"batch"`.
        score_order (`str`, *optional*, defaults to `"highest"`): `"lowest"` keeps the bottom.
    """

    def __init__(self, keep_ratio: float = 0.1, budget_scope: str = "rollout", score_order: str = "highest"):
        super().__init__(keep_ratio, budget_scope, score_order)

    def scores(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        """The divergence of each position (its rank is the rank of `δ̂`)."""
        return signals.divergence.double()

    def __repr__(self) -> str:
        return f"DivergenceTopK({self._repr_options()})"


_PAPER_SCOPE = {"budget_scope": "rollout"}

register_rule(
    RuleSpec(
        "tip",
        lambda args: SoftOR(
            args.keep_ratio,
            budget_scope=args.budget_scope,
            score_order=args.score_order,
            entropy_clip_quantile=args.entropy_clip_quantile,
        ),
        budgeted=True,
        default_keep_ratio=0.5,
        options=("budget_scope", "score_order", "entropy_clip_quantile"),
        defaults=_PAPER_SCOPE,
        summary="TIP's Soft-OR: top keep_ratio of each rollout by ĥ + δ̂ − ĥ·δ̂",
        source="TIP Eq. 7-8",
    )
)
register_rule(
    RuleSpec(
        "q3_score",
        lambda args: Q3Score(
            args.keep_ratio,
            budget_scope=args.budget_scope,
            score_order=args.score_order,
            entropy_clip_quantile=args.entropy_clip_quantile,
        ),
        budgeted=True,
        default_keep_ratio=0.1,
        options=("budget_scope", "score_order", "entropy_clip_quantile"),
        defaults=_PAPER_SCOPE,
        summary="TIP's Q3-only: top keep_ratio of each rollout by KL(P_T || P_S) · (1 − ĥ)",
        source="TIP Section 7.3, Table 4",
    )
)
register_rule(
    RuleSpec(
        "divergence_topk",
        lambda args: DivergenceTopK(args.keep_ratio, budget_scope=args.budget_scope, score_order=args.score_order),
        budgeted=True,
        default_keep_ratio=0.1,
        options=("budget_scope", "score_order"),
        defaults=_PAPER_SCOPE,
        summary="TIP's divergence-only ablation: top keep_ratio of each rollout by δ̂",
        source="TIP Table 8, Appendix B.2",
    )
)
