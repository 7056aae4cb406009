"""The paper's normalisation of the two axes: entropy clipped at a quantile, then min–max, over the batch.

TIP (Eq. 7–8, Section 7.3) scores tokens with normalised axes: `ĥ` is the entropy clipped at the batch's 98th
percentile, `h ← min(h, h_(0.98))`, then min–max normalised to `[0, 1]`; `δ̂` is the min–max normalised divergence.
Here "the batch" is the micro-batch's eligible, finite tokens gathered over all processes, so every rank normalises
identically and a rule's choice does not depend on how the rows are spread over processes.

Degenerate cases are defined: an axis whose values are all equal (span 0), or a batch with no finite token, maps to 0
for every token, so that axis adds nothing to a score and the other axis decides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


__all__ = ["MinMax", "fit_minmax", "gather_finite", "nan_quantile"]


def nan_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The `q`-quantile of the non-NaN entries of `values`, by linear interpolation (NumPy's default).

    Unlike `torch.nanquantile` it has no input-size limit. With no non-NaN entry the result is NaN.

    Args:
        values (`torch.Tensor`): 1-D tensor; NaN marks entries to ignore.
        q (`float`): Quantile in `[0, 1]`.

    Returns:
        `torch.Tensor`: 0-dim float64 tensor on the device of `values`.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}.")
    v = values.reshape(-1).double()
    if v.numel() == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=values.device)
    n = (~torch.isnan(v)).sum()
    ordered = torch.sort(v).values  # NaN sorts last
    position = q * (n - 1).clamp_min(0).double()
    low = position.floor().long()
    high = position.ceil().long()
    value = ordered[low] + (ordered[high] - ordered[low]) * (position - low.double())
    return torch.where(n > 0, value, torch.full_like(value, float("nan")))


def gather_finite(
    columns: list[torch.Tensor], finite: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    """Stacks `columns` (each `(N,)`) into `(N, k)` float64, NaN at non-finite positions, gathered over processes.

    One collective for every column; every process must call it (also with `N = 0`).
    """
    stacked = torch.stack([c.double() for c in columns], dim=1)
    stacked = torch.where(finite.unsqueeze(1), stacked, torch.full_like(stacked, float("nan")))
    return stacked if gather is None else gather(stacked)


@dataclass(frozen=True)
class MinMax:
    """A fitted min–max map `v ↦ (min(v, cap) − low) / (high − low)` (0 where `high == low`).

    Attributes:
        low: Minimum of the (clipped) fitted values, 0-dim float64.
        high: Maximum of the (clipped) fitted values, 0-dim float64.
        cap: Clipping value (`+inf` without clipping), 0-dim float64.
    """

    low: torch.Tensor
    high: torch.Tensor
    cap: torch.Tensor

    def __call__(self, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The normalised values, float64 `(N,)` in `[0, 1]`; 0 at invalid positions and when the span is 0."""
        clipped = torch.minimum(values.double(), self.cap)
        span = self.high - self.low
        scaled = (clipped - self.low) / torch.where(span > 0, span, torch.ones_like(span))
        scaled = torch.where(span > 0, scaled, torch.zeros_like(scaled)).clamp(0.0, 1.0)
        return torch.where(valid, scaled, torch.zeros_like(scaled))


def fit_minmax(gathered: torch.Tensor, clip_quantile: float | None = None) -> MinMax:
    """Fits the min–max map of one axis on its gathered values (NaN = not finite, ignored).

    Args:
        gathered (`torch.Tensor`): 1-D values of the batch over all processes, NaN at non-finite positions.
        clip_quantile (`float`, *optional*): Clip at this quantile first (the paper's `0.98` for the entropy); `None`
            or `1.0` clips nothing.

    Returns:
        [`MinMax`]: The map. With no finite value, `low = high = 0` (everything maps to 0).
    """
    v = gathered.reshape(-1).double()
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=v.device)
    if clip_quantile is None or clip_quantile >= 1.0:
        cap = inf
    else:
        cap = nan_quantile(v, clip_quantile)
        cap = torch.where(torch.isnan(cap), inf, cap)
    finite = ~torch.isnan(v)
    clipped = torch.minimum(v, cap)
    if v.numel() == 0:
        zero = torch.zeros((), dtype=torch.float64, device=v.device)
        return MinMax(zero, zero, cap)
    low = torch.where(finite, clipped, inf).min()
    high = torch.where(finite, clipped, -inf).max()
    any_finite = finite.any()
    low = torch.where(any_finite, low, torch.zeros_like(low))
    high = torch.where(any_finite, high, torch.zeros_like(high))
    return MinMax(low, high, cap)
