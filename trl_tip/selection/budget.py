"""Budgets: how many tokens a rule keeps, per rollout or per batch, and the grouped top-k and sampling behind them.

A budgeted rule keeps a share `keep_ratio` (ρ) of the eligible, finite tokens. `budget_scope` says of what:

- `"rollout"`: of each rollout (a row of the micro-batch, `TokenSignals.seq_idx`) separately. TIP keeps
  `⌊ρ·m⌋` of a rollout's `m` tokens (Eq. 8), so a rollout shorter than `1/ρ` keeps none; ssToken keeps `⌈ρ·n⌉`.
- `"batch"`: of the micro-batch on this process as a whole, `ρ·N` rounded half up (trl-tip's own budget).

Non-finite positions are never kept and do not count in `m` or `N`. Products `ρ·m` are rounded with a 1e-9 tolerance,
so that e.g. `0.29 · 100` keeps 29 tokens, not the 28 that `floor(28.999999999999996)` would give.
"""

from __future__ import annotations

import torch

from ..signals import TokenSignals


__all__ = [
    "BUDGET_ROUNDINGS",
    "BUDGET_SCOPES",
    "SCORE_ORDERS",
    "group_counts",
    "gumbel_keys",
    "group_quotas",
    "grouped_top_k",
    "planned_budget",
    "poisson_inclusion_probabilities",
    "scoped_groups",
    "scoped_top_k",
]

BUDGET_SCOPES = ("rollout", "batch")
SCORE_ORDERS = ("highest", "lowest")
BUDGET_ROUNDINGS = ("floor", "ceil", "half_up")
_TOLERANCE = 1e-9


def group_quotas(counts: torch.Tensor, keep_ratio: float, rounding: str) -> torch.Tensor:
    """Tokens kept of each group of `counts` tokens: `floor`, `ceil` or `half_up` of `keep_ratio · count`.

    Args:
        counts (`torch.Tensor`): Number of candidate tokens of each group, shape `(G,)`.
        keep_ratio (`float`): Kept share in `(0, 1]`.
        rounding (`str`): `"floor"` (TIP's `⌊ρ·m⌋`), `"ceil"` (ssToken's `⌈ρ·n⌉`) or `"half_up"`.

    Returns:
        `torch.Tensor`: Long tensor of shape `(G,)`, each at most its count.
    """
    if rounding not in BUDGET_ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} is unknown; allowed values: {', '.join(BUDGET_ROUNDINGS)}.")
    product = counts.double() * float(keep_ratio)
    if rounding == "floor":
        quota = torch.floor(product + _TOLERANCE)
    elif rounding == "ceil":
        quota = torch.ceil(product - _TOLERANCE)
    else:
        quota = torch.floor(product + 0.5 + _TOLERANCE)
    return torch.minimum(quota.long().clamp_min(0), counts.long())


def planned_budget(
    lengths: torch.Tensor, keep_ratio: float, budget_scope: str, rollout_rounding: str = "floor"
) -> torch.Tensor:
    """Tokens a budgeted rule plans to keep of rollouts of `lengths` eligible tokens: its loss denominator.

    With `budget_scope="rollout"` the rule's own quota of each rollout (`⌊keep_ratio · m⌋`, or `⌈keep_ratio · m⌉` for
    `rollout_rounding="ceil"`), which it keeps exactly unless some tokens are not finite; with `"batch"` the expected
    count `keep_ratio · m`, since the batch budget is rounded per micro-batch, which the step's split decides.

    Args:
        lengths (`torch.Tensor`): Eligible tokens of each rollout, shape `(R,)`.
        keep_ratio (`float`): Kept share in `(0, 1]`.
        budget_scope (`str`): `"rollout"` or `"batch"`.
        rollout_rounding (`str`, *optional*, defaults to `"floor"`): Rounding of the per-rollout quota.

    Returns:
        `torch.Tensor`: Float64 tensor of shape `(R,)`.
    """
    if budget_scope == "rollout":
        return group_quotas(lengths.long(), keep_ratio, rollout_rounding).double()
    return lengths.double() * float(keep_ratio)


def group_counts(groups: torch.Tensor, mask: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Number of `mask` positions in each group (long `(num_groups,)`), without a host synchronisation."""
    counts = torch.zeros(num_groups, dtype=torch.long, device=groups.device)
    return counts.scatter_add_(0, groups.long(), mask.long())


def grouped_top_k(
    keys: torch.Tensor, groups: torch.Tensor, quotas: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """Keeps, in each group, the `quotas[group]` candidates of highest key; equal keys go to the lower index.

    No host synchronisation: two stable sorts and a scatter.

    Args:
        keys (`torch.Tensor`): Finite keys of shape `(N,)`.
        groups (`torch.Tensor`): Group id of each position, shape `(N,)`, integers in `[0, G)`.
        quotas (`torch.Tensor`): Positions to keep in each group, shape `(G,)`.
        candidates (`torch.Tensor`): Boolean `(N,)`, the positions that may be kept.

    Returns:
        `torch.Tensor`: Boolean keep-mask of shape `(N,)`.
    """
    n = keys.numel()
    keep = torch.zeros(n, dtype=torch.bool, device=keys.device)
    if n == 0:
        return keep
    groups = groups.long().to(keys.device)
    quotas = quotas.to(keys.device)
    # Non-candidates rank after every candidate of their group.
    keys = torch.where(candidates, keys.double(), torch.full_like(keys, float("-inf"), dtype=torch.float64))
    # Highest key first (a stable sort keeps the lower index first among equal keys), then grouped, keeping that order.
    order = torch.sort(keys, descending=True, stable=True).indices
    order = order[torch.sort(groups[order], stable=True).indices]
    group_sorted = groups[order]
    sizes = group_counts(groups, torch.ones_like(candidates), quotas.numel())
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(n, device=keys.device) - starts[group_sorted]
    keep[order] = candidates[order] & (rank < quotas[group_sorted])
    return keep


def scoped_groups(signals: TokenSignals, budget_scope: str) -> tuple[torch.Tensor, int]:
    """The group of each position for a budget scope (its rollout, or one group) and an upper bound of their number.

    Rollouts (`seq_idx` values) are renumbered densely, `0, 1, ...` in increasing `seq_idx`, so that `N` groups always
    suffice (empty ones keep nothing) and no host synchronisation is needed to count them.
    """
    if budget_scope not in BUDGET_SCOPES:
        raise ValueError(f"budget_scope={budget_scope!r} is unknown; allowed values: {', '.join(BUDGET_SCOPES)}.")
    n = len(signals)
    device = signals.entropy.device
    if budget_scope == "batch" or n == 0:
        return torch.zeros(n, dtype=torch.long, device=device), 1
    return dense_ids(signals.seq_idx.long().to(device)), n


def dense_ids(values: torch.Tensor) -> torch.Tensor:
    """`values` renumbered `0, 1, ...` in increasing order of value (equal values, equal ids), without a sync."""
    order = torch.sort(values, stable=True).indices
    ordered = values[order]
    step = torch.ones_like(ordered)
    step[0] = 0
    step[1:] = (ordered[1:] != ordered[:-1]).long()
    ids = torch.empty_like(values)
    ids[order] = torch.cumsum(step, 0)
    return ids


def _quotas_of(signals: TokenSignals, groups: torch.Tensor, num_groups: int, keep_ratio: float, rounding: str):
    return group_quotas(group_counts(groups, signals.finite, num_groups), keep_ratio, rounding)


def scoped_top_k(
    scores: torch.Tensor,
    signals: TokenSignals,
    keep_ratio: float,
    budget_scope: str,
    score_order: str = "highest",
    rollout_rounding: str = "floor",
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """The top (or bottom) `keep_ratio` of the finite positions by `scores`, per rollout or per batch.

    Args:
        scores (`torch.Tensor`): Scores of shape `(N,)`.
        signals ([`TokenSignals`]): The micro-batch (for `finite` and `seq_idx`).
        keep_ratio (`float`): Kept share in `(0, 1]`.
        budget_scope (`str`): `"rollout"` or `"batch"`.
        score_order (`str`, *optional*, defaults to `"highest"`): `"highest"` keeps the top scores, `"lowest"` the
            bottom ones (the paper's Table 6 control).
        rollout_rounding (`str`, *optional*, defaults to `"floor"`): Rounding of the per-rollout budget.
        candidates (`torch.Tensor`, *optional*): Positions that may be kept besides being finite (all if `None`).

    Returns:
        `torch.Tensor`: Boolean keep-mask of shape `(N,)`; equal scores go to the earlier position.
    """
    if score_order not in SCORE_ORDERS:
        raise ValueError(f"score_order={score_order!r} is unknown; allowed values: {', '.join(SCORE_ORDERS)}.")
    groups, num_groups = scoped_groups(signals, budget_scope)
    rounding = rollout_rounding if budget_scope == "rollout" else "half_up"
    quotas = _quotas_of(signals, groups, num_groups, keep_ratio, rounding)
    keys = scores.double() if score_order == "highest" else -scores.double()
    allowed = signals.finite if candidates is None else signals.finite & candidates
    return grouped_top_k(keys, groups, quotas, allowed)


def gumbel_keys(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gumbel-top-k keys: the `k` highest keys are `k` draws without replacement with probability ∝ `weights`.

    Positions of weight 0 get keys below every positive-weight position, in a uniformly random order among
    themselves (they are drawn only once every positive-weight position is taken).

    Args:
        weights (`torch.Tensor`): Non-negative weights of shape `(N,)`.
        generator (`torch.Generator`): CPU generator the draw comes from (`N` uniforms are drawn).

    Returns:
        `torch.Tensor`: Float64 keys of shape `(N,)` on the device of `weights`.
    """
    n = weights.numel()
    uniform = torch.rand(n, generator=generator, dtype=torch.float64).clamp_(1e-300, 1.0)
    gumbel = -torch.log(-torch.log(uniform))
    if weights.device.type == "cuda":
        # A copy from pinned memory does not wait for the GPU queue (one from pageable memory does).
        gumbel = gumbel.pin_memory().to(weights.device, non_blocking=True)
    else:
        gumbel = gumbel.to(weights.device)
    w = weights.double()
    positive = w > 0
    return torch.where(positive, torch.log(torch.where(positive, w, 1.0)) + gumbel, gumbel - 1e6)


def poisson_inclusion_probabilities(
    weights: torch.Tensor, groups: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """Inclusion probabilities `p_t = min(1, c_g · w_t)` with `Σ_{t ∈ g} p_t = targets[g]` in each group `g`.

    The constant `c_g` of each group is found by water-filling: the largest weights are capped at 1 and the rest of
    the target is spread over the others in proportion to their weight. If a group has fewer positive-weight
    candidates than its target, all of them get `p = 1` (the target cannot be met). Zero-weight and non-candidate
    positions get `p = 0`.

    Args:
        weights (`torch.Tensor`): Non-negative weights of shape `(N,)`.
        groups (`torch.Tensor`): Group id of each position, shape `(N,)`, in `[0, G)`.
        targets (`torch.Tensor`): Expected number of kept positions of each group, shape `(G,)`, `>= 0`.
        candidates (`torch.Tensor`): Boolean `(N,)`, the positions that may be kept.

    Returns:
        `torch.Tensor`: Float64 probabilities of shape `(N,)` in `[0, 1]`.
    """
    w = weights.double()
    probs = torch.zeros_like(w)
    idx = (candidates & (w > 0)).nonzero(as_tuple=True)[0]
    if idx.numel() == 0:
        return probs
    group = groups[idx].long()
    num_groups = targets.numel()
    targets = targets.double().to(w.device)
    # Sort by group, then by descending weight within the group.
    order = torch.sort(w[idx], descending=True, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    ws, gs = w[idx][order], group[order]
    counts = torch.bincount(gs, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(ws.numel(), device=w.device) - starts[gs]
    # Suffix sums within each group: S_j = sum of the weights ranked j and after.
    group_totals = torch.zeros(num_groups, dtype=torch.float64, device=w.device).index_add_(0, gs, ws)
    # Prefix sums restarted at each group: cumulative sum minus the cumulative sum before the group's start.
    cumulative = torch.cumsum(ws, 0)
    offset = torch.where(starts > 0, cumulative[(starts - 1).clamp_min(0)], torch.zeros_like(group_totals))
    before = cumulative - ws - offset[gs]  # sum of the weights ranked before j in the group
    suffix = group_totals[gs] - before
    target = targets[gs]
    # Capping the j largest weights works when the (j+1)-th largest stays <= 1: (T - j) w_(j) <= S_j.
    fits = (target - rank.double()) * ws <= suffix * (1.0 + 1e-12)
    first = torch.full((num_groups,), ws.numel(), dtype=torch.long, device=w.device)
    first = first.scatter_reduce(0, gs, torch.where(fits, rank, torch.full_like(rank, ws.numel())), reduce="amin")
    j = first[gs]
    reachable = j < counts[gs]
    suffix_at_j = torch.zeros(num_groups, dtype=torch.float64, device=w.device)
    at_j = rank == j
    suffix_at_j = suffix_at_j.index_put_((gs[at_j],), suffix[at_j])
    scale = (target - j.double()).clamp_min(0.0) / suffix_at_j[gs].clamp_min(1e-300)
    p = torch.where(reachable & (rank >= j), scale * ws, torch.ones_like(ws)).clamp(0.0, 1.0)
    probs[idx[order]] = p
    return probs
