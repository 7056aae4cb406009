"""Q1–Q4 token statistics: accumulated every micro-batch, reduced over steps and processes at each logging step."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .signals import TokenSignals


__all__ = ["METRIC_PREFIX", "QUADRANT_NAMES", "TIPStatistics", "format_quadrant_table", "metric_names"]

METRIC_PREFIX = "tip"
_PER_QUADRANT = ("count", "kept", "entropy", "divergence", "loss")
_GLOBAL = (
    "eligible",
    "kept",
    "skipped_nonfinite",
    "entropy_threshold",
    "divergence_threshold",
    "micro_steps",
    "entropy",
    "divergence",
    "loss",
    "teacher_entropy",
    "teacher_token_prob",
    "teacher_tokens",  # finite tokens whose teacher signals are known (all but with teacher_signals="kept")
)

QUADRANT_NAMES = {1: "Q1 high H, high D", 2: "Q2 high H, low D", 3: "Q3 low H, high D", 4: "Q4 low H, low D"}


def metric_names() -> list[str]:
    """Every key [`TIPStatistics.compute`] returns, in order."""
    names = []
    for q in range(1, 5):
        names += [
            f"{METRIC_PREFIX}/q{q}/{key}" for key in ("frac", "kept_frac", "entropy", "divergence", "loss_share")
        ]
    names += [
        f"{METRIC_PREFIX}/{key}"
        for key in (
            "kept_frac",
            "entropy_threshold",
            "divergence_threshold",
            "tokens_eligible",
            "tokens_kept",
            "skipped_nonfinite",
            "entropy",
            "divergence",
            "teacher_entropy",
            "teacher_token_prob",
        )
    ]
    return names


class TIPStatistics:
    """Sums of the per-token signals by quadrant, since the last logging step, on this process.

    The sums are kept in one float64 tensor on the training device, so an update costs no host synchronisation; the
    reduction over processes happens once per logging step, in [`compute`].
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Forgets everything accumulated."""
        self.per_quadrant = torch.zeros(4, len(_PER_QUADRANT), dtype=torch.float64, device=self.device)
        self.totals = torch.zeros(len(_GLOBAL), dtype=torch.float64, device=self.device)

    @property
    def empty(self) -> bool:
        """Whether no micro-batch was recorded since the last reset."""
        return bool(self.totals[_GLOBAL.index("micro_steps")] == 0)

    @torch.no_grad()
    def update(
        self,
        signals: TokenSignals,
        quadrant: torch.Tensor,
        weights: torch.Tensor,
        entropy_threshold: float | torch.Tensor,
        divergence_threshold: float | torch.Tensor,
        num_eligible: int | None = None,
    ) -> None:
        """Adds one micro-batch.

        Args:
            signals ([`TokenSignals`]): Signals of the eligible positions.
            quadrant (`torch.Tensor`): Quadrant id (1–4) of each position.
            weights (`torch.Tensor`): Selection weight of each position (0 = dropped).
            entropy_threshold (`float`): The micro-batch's entropy split.
            divergence_threshold (`float`): The micro-batch's divergence split.
            num_eligible (`int`, *optional*): Eligible positions, non-finite ones included (defaults to
                `len(signals)`).
        """
        # Masks multiply instead of indexing, so that an update never waits for the GPU.
        dev = self.device
        f = signals.finite.to(dev, torch.float64)
        # The tokens with known teacher signals: every finite one, but only the kept ones with
        # teacher_signals="kept" (NaN teacher signals and quadrant 0 on the others); the quadrants describe these.
        quadrant = quadrant.to(dev).long()
        known = f * (quadrant > 0).double()
        q = quadrant.clamp(min=1) - 1

        def known_sum(value: torch.Tensor) -> torch.Tensor:
            return torch.where(known > 0, value.to(dev, torch.float64), 0.0)

        kept = (weights.to(dev) > 0).double() * f
        values = torch.stack(
            [
                known,
                kept * known,
                signals.entropy.to(dev, torch.float64) * known,
                known_sum(signals.divergence),
                known_sum(signals.loss),
            ],
            dim=1,
        )
        self.per_quadrant.index_add_(0, q, values)
        n_all = len(signals) if num_eligible is None else num_eligible
        n_finite = f.sum()
        t = self.totals
        t[_GLOBAL.index("eligible")] += n_finite
        t[_GLOBAL.index("kept")] += kept.sum()
        t[_GLOBAL.index("skipped_nonfinite")] += n_all - n_finite
        t[_GLOBAL.index("entropy_threshold")] += torch.as_tensor(entropy_threshold, dtype=torch.float64).to(dev)
        t[_GLOBAL.index("divergence_threshold")] += torch.as_tensor(divergence_threshold, dtype=torch.float64).to(dev)
        t[_GLOBAL.index("micro_steps")] += 1
        t[_GLOBAL.index("entropy")] += (signals.entropy.to(dev, torch.float64) * f).sum()
        t[_GLOBAL.index("divergence")] += values[:, 3].sum()
        t[_GLOBAL.index("loss")] += values[:, 4].sum()
        t[_GLOBAL.index("teacher_entropy")] += known_sum(signals.teacher_entropy).sum()
        t[_GLOBAL.index("teacher_token_prob")] += known_sum(signals.teacher_log_prob.exp()).sum()
        t[_GLOBAL.index("teacher_tokens")] += known.sum()

    def compute(
        self, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None, num_steps: int = 1
    ) -> dict[str, float]:
        """Turns the sums into metrics, after summing them over processes with `reduce_sum`.

        Token-level means (fractions, entropies, divergences, loss shares) weight every token of every step and
        process equally; thresholds are averaged over micro-batches; token counts are per optimizer step, summed over
        processes, averaged over the `num_steps` steps since the last log. A quadrant with no token reports 0.

        Args:
            reduce_sum (`Callable`, *optional*): Sums a tensor over processes (identity if `None`). Every process
                must call `compute` at the same time when it is a collective.
            num_steps (`int`, *optional*, defaults to `1`): Optimizer steps covered by the sums.

        Returns:
            `dict[str, float]`: The `tip/...` metrics (see [`metric_names`]).
        """
        packed = torch.cat([self.per_quadrant.flatten(), self.totals])
        if reduce_sum is not None:
            packed = reduce_sum(packed)
        packed = packed.double().cpu()
        per_q = packed[: self.per_quadrant.numel()].view(4, len(_PER_QUADRANT))
        tot = dict(zip(_GLOBAL, packed[self.per_quadrant.numel() :].tolist(), strict=True))

        def ratio(a: float, b: float) -> float:
            return float(a / b) if b > 0 else 0.0

        eligible, loss_total, known = tot["eligible"], tot["loss"], tot["teacher_tokens"]
        metrics: dict[str, float] = {}
        for q in range(4):
            count, kept, ent, div, loss = per_q[q].tolist()
            prefix = f"{METRIC_PREFIX}/q{q + 1}"
            metrics[f"{prefix}/frac"] = ratio(count, known)
            metrics[f"{prefix}/kept_frac"] = ratio(kept, count)
            metrics[f"{prefix}/entropy"] = ratio(ent, count)
            metrics[f"{prefix}/divergence"] = ratio(div, count)
            metrics[f"{prefix}/loss_share"] = ratio(loss, loss_total)
        steps = max(num_steps, 1)
        metrics[f"{METRIC_PREFIX}/kept_frac"] = ratio(tot["kept"], eligible)
        metrics[f"{METRIC_PREFIX}/entropy_threshold"] = ratio(tot["entropy_threshold"], tot["micro_steps"])
        metrics[f"{METRIC_PREFIX}/divergence_threshold"] = ratio(tot["divergence_threshold"], tot["micro_steps"])
        metrics[f"{METRIC_PREFIX}/tokens_eligible"] = eligible / steps
        metrics[f"{METRIC_PREFIX}/tokens_kept"] = tot["kept"] / steps
        metrics[f"{METRIC_PREFIX}/skipped_nonfinite"] = tot["skipped_nonfinite"] / steps
        metrics[f"{METRIC_PREFIX}/entropy"] = ratio(tot["entropy"], eligible)
        metrics[f"{METRIC_PREFIX}/divergence"] = ratio(tot["divergence"], known)
        metrics[f"{METRIC_PREFIX}/teacher_entropy"] = ratio(tot["teacher_entropy"], known)
        metrics[f"{METRIC_PREFIX}/teacher_token_prob"] = ratio(tot["teacher_token_prob"], known)
        return metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The accumulated sums (saved in checkpoints so that a resumed run logs the same values)."""
        return {"per_quadrant": self.per_quadrant.detach().cpu().clone(), "totals": self.totals.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores sums saved by [`state_dict`]."""
        self.per_quadrant = state["per_quadrant"].to(self.device, torch.float64)
        totals = state["totals"].to(self.device, torch.float64)
        if totals.numel() == len(_GLOBAL) - 1:
            # A checkpoint from before `teacher_tokens` was counted: the teacher's signals were known on every token.
            totals = torch.cat([totals, totals[_GLOBAL.index("eligible")].reshape(1)])
        self.totals = totals


def format_quadrant_table(logs: dict[str, float]) -> str:
    """A text table of one log entry's `tip/...` metrics: per quadrant the tokens and the kept tokens per step
    (counts), the quadrant's share of the tokens, the share of it kept, its share of the loss and its mean signals;
    a line `all` with the totals, and a line with the thresholds.

    Args:
        logs (`dict[str, float]`): One entry of `trainer.state.log_history` (a missing quadrant key prints as `nan`).

    Returns:
        `str`: The table.
    """
    p = METRIC_PREFIX
    eligible = logs.get(f"{p}/tokens_eligible", float("nan"))
    header = ("tokens/step", "share", "kept/step", "kept share", "loss share", "mean H", "mean D")
    widths = (13, 8, 11, 12, 12, 9, 9)
    lines = [f"{'quadrant':<18}" + "".join(f"{h:>{w}}" for h, w in zip(header, widths))]
    for q in range(1, 5):
        frac, kept_frac, entropy, divergence, loss_share = (
            logs.get(f"{p}/q{q}/{key}", float("nan"))
            for key in ("frac", "kept_frac", "entropy", "divergence", "loss_share")
        )
        values = (
            f"{frac * eligible:.1f}",
            f"{frac:.3f}",
            f"{kept_frac * frac * eligible:.1f}",
            f"{kept_frac:.3f}",
            f"{loss_share:.3f}",
            f"{entropy:.4f}",
            f"{divergence:.4f}",
        )
        lines.append(f"{QUADRANT_NAMES[q]:<18}" + "".join(f"{v:>{w}}" for v, w in zip(values, widths)))
    kept_frac = logs.get(f"{p}/kept_frac", float("nan"))
    kept = logs.get(f"{p}/tokens_kept", kept_frac * eligible)
    total = (f"{eligible:.1f}", "1.000", f"{kept:.1f}", f"{kept_frac:.3f}", "1.000")
    lines.append(f"{'all':<18}" + "".join(f"{v:>{w}}" for v, w in zip(total, widths)))
    lines.append(
        f"thresholds: H >= {logs.get(f'{p}/entropy_threshold', float('nan')):.4f} (student entropy / ln V), "
        f"D >= {logs.get(f'{p}/divergence_threshold', float('nan')):.4f} (teacher-student divergence)"
    )
    return "\n".join(lines)
