"""Selection rules: all, random, entropy top-k, entropy sampling, quadrant subsets and trl-tip's quadrant budget.

The TIP paper's score rules (Soft-OR `tip`, `q3_score`, `divergence_topk`) are in [`paper`]; ssToken in
`trl_tip.sstoken`. Every budgeted rule keeps its share per rollout or per batch (`budget_scope`, see [`budget`]).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..signals import TokenSignals
from .base import QUADRANTS, SelectionContext
from .budget import (
    BUDGET_SCOPES,
    SCORE_ORDERS,
    group_counts,
    group_quotas,
    grouped_top_k,
    gumbel_keys,
    planned_budget,
    poisson_inclusion_probabilities,
    scoped_groups,
    scoped_top_k,
)
from .normalize import nan_quantile
from .registry import KEEP_RATIO, OptionSpec, RuleSpec, check_option, one_of, register_option, register_rule


__all__ = [
    "SAMPLING_ESTIMATORS",
    "AllTokens",
    "EntropyDivergenceSample",
    "EntropySample",
    "EntropyTopK",
    "QuadrantBudget",
    "QuadrantSubset",
    "RandomTokens",
    "check_choice",
    "check_keep_ratio",
]

SAMPLING_ESTIMATORS = ("fixed_budget", "importance_weighted")


# The rule-specific options, each checked once: by `TIPArguments` validation and by the rules' constructors
# (`check_option`).
def _non_negative(name: str):
    def check(value) -> str | None:
        return None if value >= 0 else f"{name} must be >= 0, got {value}."

    return check


def _unit_interval(name: str):
    def check(value) -> str | None:
        return None if 0.0 <= value <= 1.0 else f"{name} must be in [0, 1], got {value}."

    return check


def _clip_quantile(value) -> str | None:
    if 0.0 < value <= 1.0:
        return None
    return f"entropy_clip_quantile must be in (0, 1] (1 clips nothing), got {value}."


register_option(OptionSpec("entropy_alpha", 1.0, _non_negative("entropy_alpha")))
register_option(OptionSpec("divergence_gamma", 1.0, _non_negative("divergence_gamma")))
register_option(OptionSpec("q3_share", 0.5, _unit_interval("q3_share")))
register_option(OptionSpec("quadrants"))
register_option(OptionSpec("budget_scope", "batch", one_of("budget_scope", BUDGET_SCOPES)))
register_option(OptionSpec("score_order", "highest", one_of("score_order", SCORE_ORDERS)))
register_option(OptionSpec("entropy_clip_quantile", 0.98, _clip_quantile))
register_option(OptionSpec("sampling_estimator", "fixed_budget", one_of("sampling_estimator", SAMPLING_ESTIMATORS)))


def check_keep_ratio(keep_ratio: float) -> float:
    """`keep_ratio` as a float, or a `ValueError` if it is not a number in `(0, 1]` (the registry's one check)."""
    return float(check_option(KEEP_RATIO, keep_ratio))


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    """`value`, or a `ValueError` naming the option `name` and the allowed values."""
    return check_option(OptionSpec(name, check=one_of(name, allowed)), value)


class AllTokens:
    """Keeps every eligible token: exactly GKD's loss.

    It declares `keeps_every_token`, so the engine takes the loss in the signals pass (one pass over the logits).
    """

    keeps_every_token = True

    def __call__(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        return torch.ones(len(signals), dtype=torch.bool, device=signals.entropy.device)

    def __repr__(self) -> str:
        return "AllTokens()"


class EntropyDivergenceSample:
    """Samples `keep_ratio` of the tokens with weight `H^alpha * D^gamma`, per batch (default) or per rollout.

    With `estimator="fixed_budget"` (default) exactly the budget is drawn without replacement (Gumbel top-k, the
    same distribution as `torch.multinomial(weights, k, replacement=False)`), and the loss is the mean over the kept
    tokens. With `estimator="importance_weighted"` (TIP Appendix A.3) each token is kept independently with
    probability `p_t = min(1, c · w_t)`, `c` chosen so that `Σ p_t = keep_ratio · m` in each rollout (or batch), kept
    tokens are weighted `1 / p_t` and the loss is divided by the eligible count: `Σ_kept g_t / p_t / m` is then an
    unbiased estimate of the all-token mean of any per-token `g` over the tokens with `p_t > 0` (every token when
    `alpha = gamma = 0`, else every token of positive weight; a token of zero entropy has zero gradient when
    `beta > 0`).

    `gamma = 0` is pure entropy sampling ([`EntropySample`]), `alpha = gamma = 0` uniform.

    Args:
        keep_ratio (`float`): Kept share in `(0, 1]` (expected share with `importance_weighted`).
        alpha (`float`, *optional*, defaults to `1.0`): Exponent on the entropy.
        gamma (`float`, *optional*, defaults to `1.0`): Exponent on the divergence.
        budget_scope (`str`, *optional*, defaults to `"batch"`): `"batch"` (this process's micro-batch,
            `keep_ratio · N` rounded half up) or `"rollout"` (`⌊keep_ratio · m⌋` of each rollout).
        estimator (`str`, *optional*, defaults to `"fixed_budget"`): `"fixed_budget"` or `"importance_weighted"`.
    """

    def __init__(
        self,
        keep_ratio: float,
        alpha: float = 1.0,
        gamma: float = 1.0,
        budget_scope: str = "batch",
        estimator: str = "fixed_budget",
    ):
        self.keep_ratio = check_keep_ratio(keep_ratio)
        self.alpha = float(check_option("entropy_alpha", alpha))
        self.gamma = float(check_option("divergence_gamma", gamma))
        self.budget_scope = check_option("budget_scope", budget_scope)
        self.estimator = check_option("sampling_estimator", estimator)
        # What it reads: a pure entropy (or uniform) draw needs no teacher signal.
        self.requires = frozenset({"entropy", "finite"} | ({"divergence"} if self.gamma != 0 else set()))

    def planned_kept(self, lengths: torch.Tensor) -> torch.Tensor:
        """Loss denominator of rollouts of `lengths` tokens: the budget, or every eligible token for the
        importance-weighted estimator (whose `1 / p` weights make `Σ_kept g / p / m` estimate the all-token mean)."""
        if self.estimator == "importance_weighted":
            return lengths.double()
        return planned_budget(lengths, self.keep_ratio, self.budget_scope)

    def weights(self, signals: TokenSignals) -> torch.Tensor:
        """Sampling weight of each token (0 at non-finite positions)."""
        w = signals.entropy.clamp_min(0).pow(self.alpha)
        if self.gamma != 0:
            w = w * signals.divergence.clamp_min(0).pow(self.gamma)
        return torch.where(signals.finite, w, torch.zeros_like(w))

    def inclusion_probabilities(self, signals: TokenSignals) -> torch.Tensor:
        """`importance_weighted`: the probability `p_t` with which each token is kept (float64 `(N,)`)."""
        groups, num_groups = scoped_groups(signals, self.budget_scope)
        counts = group_counts(groups, signals.finite, num_groups).double()
        return poisson_inclusion_probabilities(self.weights(signals), groups, self.keep_ratio * counts, signals.finite)

    def __call__(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        if self.estimator == "importance_weighted":
            probs = self.inclusion_probabilities(signals)
            uniform = torch.rand(len(signals), generator=context.generator, dtype=torch.float64).to(probs.device)
            kept = uniform < probs
            return torch.where(kept, 1.0 / probs.clamp_min(1e-300), torch.zeros_like(probs)).float()
        groups, num_groups = scoped_groups(signals, self.budget_scope)
        rounding = "floor" if self.budget_scope == "rollout" else "half_up"
        quotas = group_quotas(group_counts(groups, signals.finite, num_groups), self.keep_ratio, rounding)
        # Only finite positions are candidates: when fewer than the budget have a positive weight (H = 0 or D = 0),
        # the budget is filled with zero-weight finite positions, not with non-finite ones the trainer would drop.
        return grouped_top_k(gumbel_keys(self.weights(signals), context.generator), groups, quotas, signals.finite)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(keep_ratio={self.keep_ratio}, alpha={self.alpha}, gamma={self.gamma}, "
            f"budget_scope={self.budget_scope!r}, estimator={self.estimator!r})"
        )


class EntropySample(EntropyDivergenceSample):
    """Samples `keep_ratio` of the tokens with probability ∝ `H^alpha`: TIP's entropy sampling (Table 3, `alpha=1`).

    See [`EntropyDivergenceSample`] for the budget scopes and the importance-weighted estimator.
    """

    def __init__(
        self, keep_ratio: float, alpha: float = 1.0, budget_scope: str = "batch", estimator: str = "fixed_budget"
    ):
        super().__init__(keep_ratio, alpha=alpha, gamma=0.0, budget_scope=budget_scope, estimator=estimator)

    def __repr__(self) -> str:
        return (
            f"EntropySample(keep_ratio={self.keep_ratio}, alpha={self.alpha}, budget_scope={self.budget_scope!r}, "
            f"estimator={self.estimator!r})"
        )


class RandomTokens(EntropyDivergenceSample):
    """Keeps `keep_ratio` of the tokens, drawn uniformly without replacement (a control)."""

    def __init__(self, keep_ratio: float, budget_scope: str = "batch"):
        super().__init__(keep_ratio, alpha=0.0, gamma=0.0, budget_scope=budget_scope)
        self.requires = frozenset({"finite"})

    def weights(self, signals: TokenSignals) -> torch.Tensor:
        return signals.finite.float()

    def __repr__(self) -> str:
        return f"RandomTokens(keep_ratio={self.keep_ratio}, budget_scope={self.budget_scope!r})"


class EntropyTopK:
    """Keeps the tokens of highest (or lowest) entropy.

    `budget_scope="batch"` (default): like `GRPOConfig.top_entropy_quantile`, the cut is the `(1 - keep_ratio)`-quantile
    (`keep_ratio`-quantile for `score_order="lowest"`) of the entropies gathered from every process, so all ranks use
    the same cut; tokens at or above it (at or below it) are kept, ties at the cut included. `budget_scope="rollout"`:
    the `⌊keep_ratio · m⌋` tokens of highest (lowest) entropy of each rollout.
    """

    requires = frozenset({"entropy", "finite"})

    def __init__(self, keep_ratio: float, budget_scope: str = "batch", score_order: str = "highest"):
        self.keep_ratio = check_keep_ratio(keep_ratio)
        self.budget_scope = check_option("budget_scope", budget_scope)
        self.score_order = check_option("score_order", score_order)

    def planned_kept(self, lengths: torch.Tensor) -> torch.Tensor:
        """Loss denominator of rollouts of `lengths` tokens (`⌊keep_ratio · m⌋`, or `keep_ratio · m` per batch)."""
        return planned_budget(lengths, self.keep_ratio, self.budget_scope)

    def __call__(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        if self.budget_scope == "rollout":
            return scoped_top_k(signals.entropy, signals, self.keep_ratio, "rollout", self.score_order)
        if self.keep_ratio >= 1.0:
            return signals.finite.clone()
        nan = torch.full_like(signals.entropy, float("nan"))
        all_entropy = context.gather_values(torch.where(signals.finite, signals.entropy, nan))
        # NaN marks non-finite positions (ignored); no finite position at all keeps nothing.
        if self.score_order == "highest":
            threshold = nan_quantile(all_entropy, 1.0 - self.keep_ratio)
            return (signals.entropy.double() >= threshold) & signals.finite
        threshold = nan_quantile(all_entropy, self.keep_ratio)
        return (signals.entropy.double() <= threshold) & signals.finite

    def __repr__(self) -> str:
        return (
            f"EntropyTopK(keep_ratio={self.keep_ratio}, budget_scope={self.budget_scope!r}, "
            f"score_order={self.score_order!r})"
        )


def parse_quadrants(quadrants: Iterable[str]) -> tuple[int, ...]:
    """Turns names such as `["Q3"]` or `["q1", "Q3"]` into quadrant ids `(3,)`, `(1, 3)`.

    Raises:
        ValueError: on an empty list or an unknown name.
    """
    if isinstance(quadrants, str):
        quadrants = [quadrants]
    ids = []
    for name in quadrants:
        key = str(name).strip().upper()
        if key not in QUADRANTS:
            raise ValueError(f"Unknown quadrant {name!r} in quadrants; allowed values: {', '.join(QUADRANTS)}.")
        ids.append(QUADRANTS.index(key) + 1)
    if not ids:
        raise ValueError(f"quadrants must name at least one of {', '.join(QUADRANTS)}.")
    return tuple(sorted(set(ids)))


class QuadrantSubset:
    """Keeps every token of the given quadrants of the median split, e.g. `["Q3"]` or `["Q1", "Q3"]`.

    The kept share is whatever the quadrants hold. This is not the TIP paper's Q3-only rule, which ranks by a score at
    a fixed budget: see [`Q3Score`].
    """

    def __init__(self, quadrants: Iterable[str]):
        self.quadrant_ids = parse_quadrants(quadrants)

    def __call__(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        ids = torch.tensor(self.quadrant_ids, device=context.quadrant.device)
        return torch.isin(context.quadrant, ids)

    def __repr__(self) -> str:
        return f"QuadrantSubset(quadrants={[QUADRANTS[i - 1] for i in self.quadrant_ids]})"


class QuadrantBudget:
    """trl-tip's own type-aware rule (not the paper's): a Q3 share of the budget by divergence, the rest by entropy.

    In each budget group (this process's micro-batch, or each rollout with `budget_scope="rollout"`) with budget `K`:
    Q3 tokens (low entropy, high divergence, by the quadrant split) get `k3 = min(n_Q3, round(q3_share · K))` places
    (half to even), filled by descending divergence; high-entropy tokens (Q1 and Q2) get `min(n_Q1 + n_Q2, K − k3)`,
    filled by descending entropy; places the high-entropy group cannot fill go back to Q3. Q4 tokens (confident and
    right) are never kept, so fewer than `K` tokens are kept when Q1–Q3 hold fewer than `K`.

    This rule was named `tip` in trl-tip 0.2; the paper's rule, Soft-OR, is [`SoftOR`].
    """

    def __init__(self, keep_ratio: float, q3_share: float = 0.5, budget_scope: str = "batch"):
        self.keep_ratio = check_keep_ratio(keep_ratio)
        self.q3_share = float(check_option("q3_share", q3_share))
        self.budget_scope = check_option("budget_scope", budget_scope)

    def planned_kept(self, lengths: torch.Tensor) -> torch.Tensor:
        """Loss denominator of rollouts of `lengths` tokens: the budget `K` (fewer are kept when Q1–Q3 hold fewer)."""
        return planned_budget(lengths, self.keep_ratio, self.budget_scope)

    def __call__(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        q = context.quadrant.to(signals.entropy.device)
        q3 = (q == 3) & signals.finite
        uncertain = ((q == 1) | (q == 2)) & signals.finite
        groups, num_groups = scoped_groups(signals, self.budget_scope)
        counts = torch.stack([group_counts(groups, mask, num_groups) for mask in (signals.finite, q3, uncertain)])
        rounding = "floor" if self.budget_scope == "rollout" else "half_up"
        k = group_quotas(counts[0], self.keep_ratio, rounding)
        n_q3, n_unc = counts[1], counts[2]
        k_q3 = torch.minimum(n_q3, torch.round(self.q3_share * k.double()).long())
        k_unc = torch.minimum(n_unc, k - k_q3)
        k_q3 = torch.minimum(n_q3, k - k_unc)
        return grouped_top_k(signals.divergence, groups, k_q3, q3) | grouped_top_k(
            signals.entropy, groups, k_unc, uncertain
        )

    def __repr__(self) -> str:
        return (
            f"QuadrantBudget(keep_ratio={self.keep_ratio}, q3_share={self.q3_share}, "
            f"budget_scope={self.budget_scope!r})"
        )


# ---------------------------------------------------------------------------------------------------- registry


register_rule(RuleSpec("all", lambda args: AllTokens(), budgeted=False, summary="every completion token (GKD's loss)"))
register_rule(
    RuleSpec(
        "random",
        lambda args: RandomTokens(args.keep_ratio, budget_scope=args.budget_scope),
        budgeted=True,
        default_keep_ratio=0.5,
        options=("budget_scope",),
        summary="keep_ratio of the tokens, uniformly (a control)",
    )
)
register_rule(
    RuleSpec(
        "entropy_topk",
        lambda args: EntropyTopK(args.keep_ratio, budget_scope=args.budget_scope, score_order=args.score_order),
        budgeted=True,
        default_keep_ratio=0.5,
        options=("budget_scope", "score_order"),
        summary="tokens whose entropy is in the top keep_ratio (over all processes, or per rollout)",
    )
)
register_rule(
    RuleSpec(
        "entropy_sample",
        lambda args: EntropySample(
            args.keep_ratio,
            alpha=args.entropy_alpha,
            budget_scope=args.budget_scope,
            estimator=args.sampling_estimator,
        ),
        budgeted=True,
        default_keep_ratio=0.5,
        options=("entropy_alpha", "budget_scope", "sampling_estimator"),
        summary="keep_ratio of the tokens sampled with probability ∝ H^alpha (TIP's entropy sampling, Table 3)",
        source="TIP Table 3, Appendix A.3",
    )
)
register_rule(
    RuleSpec(
        "entropy_divergence_sample",
        lambda args: EntropyDivergenceSample(
            args.keep_ratio,
            alpha=args.entropy_alpha,
            gamma=args.divergence_gamma,
            budget_scope=args.budget_scope,
            estimator=args.sampling_estimator,
        ),
        budgeted=True,
        default_keep_ratio=0.5,
        options=("entropy_alpha", "divergence_gamma", "budget_scope", "sampling_estimator"),
        summary="keep_ratio of the tokens sampled with probability ∝ H^alpha * D^gamma",
    )
)
register_rule(
    RuleSpec(
        "quadrants",
        lambda args: QuadrantSubset(args.quadrants),
        budgeted=False,
        options=("quadrants",),
        required=("quadrants",),
        summary="every token of the listed quadrants (median split by default)",
    )
)
register_rule(
    RuleSpec(
        "quadrant_budget",
        lambda args: QuadrantBudget(args.keep_ratio, q3_share=args.q3_share, budget_scope=args.budget_scope),
        budgeted=True,
        default_keep_ratio=0.5,
        options=("q3_share", "budget_scope"),
        summary="trl-tip's rule: a Q3 share of the budget by divergence, the rest to high-entropy tokens by entropy",
    )
)
