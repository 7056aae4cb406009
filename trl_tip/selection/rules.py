"""TIP selection rules: all, random, entropy top-k, entropy sampling, quadrant subsets and the type-aware rule."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..signals import TokenSignals
from .base import QUADRANTS, SelectionContext, budget, sample_without_replacement, top_k_mask
from .registry import OptionSpec, RuleSpec, register_option, register_rule


__all__ = [
    "AllTokens",
    "EntropyDivergenceSample",
    "EntropySample",
    "EntropyTopK",
    "QuadrantSubset",
    "RandomTokens",
    "TypeAware",
]


def _check_ratio(keep_ratio: float) -> float:
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}.")
    return float(keep_ratio)


class AllTokens:
    """Keeps every eligible token: exactly GKD's loss."""

    def __call__(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        return torch.ones(len(signals), dtype=torch.bool, device=signals.entropy.device)

    def __repr__(self) -> str:
        return "AllTokens()"


class RandomTokens:
    """Keeps `keep_ratio` of the tokens of each process, drawn uniformly without replacement."""

    def __init__(self, keep_ratio: float):
        self.keep_ratio = _check_ratio(keep_ratio)

    def __call__(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        n_finite = int(signals.finite.sum())
        return sample_without_replacement(
            signals.finite.float(), budget(n_finite, self.keep_ratio), context.generator, signals.finite, n_finite
        )

    def __repr__(self) -> str:
        return f"RandomTokens(keep_ratio={self.keep_ratio})"


class EntropyTopK:
    """Keeps the tokens whose entropy is in the top `keep_ratio` of the step over all processes.

    Like `GRPOConfig.top_entropy_quantile`: the threshold is the `(1 - keep_ratio)`-quantile of the entropies
    gathered from every process, so all ranks use the same cut; tokens at or above it are kept.
    """

    def __init__(self, keep_ratio: float):
        self.keep_ratio = _check_ratio(keep_ratio)

    def __call__(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        if self.keep_ratio >= 1.0:
            return torch.ones(len(signals), dtype=torch.bool, device=signals.entropy.device)
        nan = torch.full_like(signals.entropy, float("nan"))
        all_entropy = context.gather_values(torch.where(signals.finite, signals.entropy, nan))
        if all_entropy.numel() == 0:
            return torch.zeros(len(signals), dtype=torch.bool, device=signals.entropy.device)
        # NaN marks non-finite positions (ignored by `nanquantile`); no finite position at all keeps nothing.
        threshold = torch.nanquantile(all_entropy.float(), 1.0 - self.keep_ratio)
        return (signals.entropy >= threshold) & signals.finite

    def __repr__(self) -> str:
        return f"EntropyTopK(keep_ratio={self.keep_ratio})"


class EntropyDivergenceSample:
    """Samples `keep_ratio` of the tokens without replacement, with weight `H^alpha * D^gamma`.

    This is the reference implementation's rule; `gamma = 0` is pure entropy sampling, `alpha = gamma = 0` uniform.
    """

    def __init__(self, keep_ratio: float, alpha: float = 1.0, gamma: float = 1.0):
        self.keep_ratio = _check_ratio(keep_ratio)
        if alpha < 0 or gamma < 0:
            raise ValueError(f"alpha and gamma must be >= 0, got alpha={alpha}, gamma={gamma}.")
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    def weights(self, signals: TokenSignals) -> torch.Tensor:
        """Sampling weight of each token."""
        w = signals.entropy.clamp_min(0).pow(self.alpha)
        if self.gamma != 0:
            w = w * signals.divergence.clamp_min(0).pow(self.gamma)
        return torch.where(signals.finite, w, torch.zeros_like(w))

    def __call__(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        n_finite = int(signals.finite.sum())
        k = budget(n_finite, self.keep_ratio)
        # Only finite positions are candidates: when fewer than `k` have a positive weight (H = 0 or D = 0), the
        # budget is filled with zero-weight finite positions, not with non-finite ones the trainer would drop.
        return sample_without_replacement(self.weights(signals), k, context.generator, signals.finite, n_finite)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(keep_ratio={self.keep_ratio}, alpha={self.alpha}, gamma={self.gamma})"


class EntropySample(EntropyDivergenceSample):
    """Samples `keep_ratio` of the tokens without replacement, with weight `H^alpha` (the paper's 50% rule)."""

    def __init__(self, keep_ratio: float, alpha: float = 1.0):
        super().__init__(keep_ratio, alpha=alpha, gamma=0.0)

    def __repr__(self) -> str:
        return f"EntropySample(keep_ratio={self.keep_ratio}, alpha={self.alpha})"


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
    """Keeps every token of the given quadrants, e.g. `["Q3"]` (confident and wrong) or `["Q1", "Q3"]`."""

    def __init__(self, quadrants: Iterable[str]):
        self.quadrant_ids = parse_quadrants(quadrants)

    def __call__(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        ids = torch.tensor(self.quadrant_ids, device=context.quadrant.device)
        return torch.isin(context.quadrant, ids)

    def __repr__(self) -> str:
        return f"QuadrantSubset(quadrants={[QUADRANTS[i - 1] for i in self.quadrant_ids]})"


class TypeAware:
    """TIP's type-aware rule: uncertain tokens (high H) and confident-but-wrong tokens (Q3), within a budget.

    With `N` finite tokens on the process, the budget is `K = round(keep_ratio * N)`. Q3 tokens (low entropy,
    high divergence) get `round(q3_share * K)` places, filled by descending divergence; high-entropy tokens (Q1 and
    Q2) get the rest, filled by descending entropy. Places one group cannot fill go to the other. Q4 tokens
    (confident and right) are never kept, so fewer than `K` tokens are kept when Q1–Q3 hold fewer than `K`.
    """

    def __init__(self, keep_ratio: float, q3_share: float = 0.5):
        self.keep_ratio = _check_ratio(keep_ratio)
        if not 0.0 <= q3_share <= 1.0:
            raise ValueError(f"q3_share must be in [0, 1], got {q3_share}.")
        self.q3_share = float(q3_share)

    def __call__(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        q = context.quadrant
        q3 = (q == 3) & signals.finite
        uncertain = ((q == 1) | (q == 2)) & signals.finite
        n_finite, n_q3, n_unc = torch.stack([signals.finite.sum(), q3.sum(), uncertain.sum()]).tolist()
        k = budget(n_finite, self.keep_ratio)
        k_q3 = min(n_q3, int(round(self.q3_share * k)))
        k_unc = min(n_unc, k - k_q3)
        k_q3 = min(n_q3, k - k_unc)
        return top_k_mask(signals.divergence, k_q3, q3, n_q3) | top_k_mask(signals.entropy, k_unc, uncertain, n_unc)

    def __repr__(self) -> str:
        return f"TypeAware(keep_ratio={self.keep_ratio}, q3_share={self.q3_share})"


# ---------------------------------------------------------------------------------------------------- registry


def _non_negative(name: str):
    def check(value) -> str | None:
        return None if value >= 0 else f"{name} must be >= 0, got {value}."

    return check


def _unit_interval(name: str):
    def check(value) -> str | None:
        return None if 0.0 <= value <= 1.0 else f"{name} must be in [0, 1], got {value}."

    return check


register_option(OptionSpec("entropy_alpha", 1.0, _non_negative("entropy_alpha")))
register_option(OptionSpec("divergence_gamma", 1.0, _non_negative("divergence_gamma")))
register_option(OptionSpec("tip_q3_share", 0.5, _unit_interval("tip_q3_share")))
register_option(OptionSpec("quadrants"))

register_rule(RuleSpec("all", lambda args: AllTokens(), budgeted=False, summary="every completion token (GKD's loss)"))
register_rule(
    RuleSpec(
        "random",
        lambda args: RandomTokens(args.keep_ratio),
        budgeted=True,
        default_keep_ratio=0.5,
        summary="keep_ratio of the tokens, uniformly (a control)",
    )
)
register_rule(
    RuleSpec(
        "entropy_topk",
        lambda args: EntropyTopK(args.keep_ratio),
        budgeted=True,
        default_keep_ratio=0.5,
        summary="tokens whose entropy is in the top keep_ratio of the step over all processes",
    )
)
register_rule(
    RuleSpec(
        "entropy_sample",
        lambda args: EntropySample(args.keep_ratio, alpha=args.entropy_alpha),
        budgeted=True,
        default_keep_ratio=0.5,
        options=("entropy_alpha",),
        summary="keep_ratio of the tokens sampled without replacement with weight H^alpha",
    )
)
register_rule(
    RuleSpec(
        "entropy_divergence_sample",
        lambda args: EntropyDivergenceSample(args.keep_ratio, alpha=args.entropy_alpha, gamma=args.divergence_gamma),
        budgeted=True,
        default_keep_ratio=0.5,
        options=("entropy_alpha", "divergence_gamma"),
        summary="keep_ratio of the tokens sampled without replacement with weight H^alpha * D^gamma",
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
        "tip",
        lambda args: TypeAware(args.keep_ratio, q3_share=args.tip_q3_share),
        budgeted=True,
        default_keep_ratio=0.5,
        options=("tip_q3_share",),
        summary="a Q3 share of the budget by divergence, the rest to high-entropy tokens by entropy",
    )
)
