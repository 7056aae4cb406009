"""What every rule shares besides its own score: the processes, the quadrant thresholds, the seeded generator.

[`Processes`] wraps the collectives of an `accelerate.Accelerator` (or nothing, on one process); the quadrant
thresholds are fixed values or quantiles of the micro-batch's eligible tokens gathered over every process, so all ranks split
identically; [`selection_seed`] derives a reproducible per-micro-batch seed. [`build_context`] puts them together into
the [`SelectionContext`] a rule is called with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..signals import TokenSignals
from .base import SelectionContext, assign_quadrants
from .normalize import nan_quantile


__all__ = ["Processes", "QuadrantSplit", "build_context", "quadrant_thresholds", "selection_seed"]


class Processes:
    """The collectives selection needs, over the processes of a run (no-ops on one process).

    Args:
        accelerator (`accelerate.Accelerator`, *optional*): The trainer's accelerator; `None` for one process.
    """

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.num_processes = 1 if accelerator is None else accelerator.num_processes
        self.process_index = 0 if accelerator is None else accelerator.process_index

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of `tensor` over processes (the tensor itself on one process)."""
        if self.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor, reduction="sum")

    def gather_rows(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenates `values` over processes along the first dimension, whose size may differ per process."""
        if self.num_processes == 1:
            return values
        world = self.num_processes
        sizes = self.accelerator.gather(torch.tensor([values.size(0)], device=values.device))
        padded = values.new_zeros((int(sizes.max()), *values.shape[1:]))
        padded[: values.size(0)] = values
        gathered = self.accelerator.gather(padded).view(world, -1, *values.shape[1:])
        return torch.cat([gathered[r, : int(sizes[r])] for r in range(world)])

    @property
    def reducer(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """`reduce_sum` when there are several processes, else `None` (what `TIPStatistics.compute` takes)."""
        return self.reduce_sum if self.num_processes > 1 else None


@dataclass(frozen=True)
class QuadrantSplit:
    """How the quadrants are split: fixed thresholds (both set) or quantiles of the micro-batch's tokens (over all
    processes).

    Attributes:
        entropy_threshold: Fixed entropy split, or `None` for the quantile split.
        divergence_threshold: Fixed divergence split, or `None`.
        entropy_quantile: Quantile of the gathered entropies used as the split (`0.5`: the median).
        divergence_quantile: Quantile of the gathered divergences used as the split.
    """

    entropy_threshold: float | None = None
    divergence_threshold: float | None = None
    entropy_quantile: float = 0.5
    divergence_quantile: float = 0.5

    @classmethod
    def from_args(cls, args) -> QuadrantSplit:
        """The split a [`TIPArguments`] config describes."""
        return cls(
            args.entropy_threshold,
            args.divergence_threshold,
            args.entropy_threshold_quantile,
            args.divergence_threshold_quantile,
        )


def quadrant_thresholds(
    signals: TokenSignals, split: QuadrantSplit, gather: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """Entropy and divergence splits of the quadrants: fixed, or quantiles of the micro-batch's finite tokens over
    every process.

    The quantiles are those of [`nan_quantile`] (linear interpolation, in float64, no input-size limit), as every
    other quantile of the selection. Quantile thresholds are 0-dim float64 tensors on the signals' device, so that
    nothing here waits for the GPU. With no finite position on any process the split is `(0, 0)`.
    """
    if split.entropy_threshold is not None:
        return float(split.entropy_threshold), float(split.divergence_threshold)
    nan = torch.full_like(signals.entropy, float("nan"))
    values = torch.stack(
        [torch.where(signals.finite, signals.entropy, nan), torch.where(signals.finite, signals.divergence, nan)],
        dim=1,
    )
    both = values if gather is None else gather(values)
    if both.size(0) == 0:
        return 0.0, 0.0
    # Non-finite positions are NaN and ignored; with no finite position at all the split is 0.
    entropy_threshold = nan_quantile(both[:, 0], split.entropy_quantile).nan_to_num(0.0)
    divergence_threshold = nan_quantile(both[:, 1], split.divergence_quantile).nan_to_num(0.0)
    return entropy_threshold, divergence_threshold


def selection_seed(seed: int, step: int, micro: int, process_index: int, evaluation: bool = False) -> int:
    """A seed for the selection of one micro-batch, from the run seed, the optimizer step, the micro-batch index
    within the step (or within the evaluation), the rank, and whether it is an evaluation batch."""
    value = ((seed * 1_000_003 + step) * 10_007 + micro) * 1_009 + process_index
    if evaluation:
        value = value * 7 + 3
    return value % (2**63 - 1)


def build_context(
    signals: TokenSignals,
    split: QuadrantSplit,
    processes: Processes,
    generator: torch.Generator,
    global_step: int,
    extras: dict[str, torch.Tensor] | None = None,
    training: bool = True,
) -> SelectionContext:
    """The [`SelectionContext`] of one micro-batch: thresholds and quadrants (non-finite positions in quadrant 0),
    the generator, the processes' gather, and the extra per-token inputs the rule asked for."""
    entropy_threshold, divergence_threshold = quadrant_thresholds(signals, split, processes.gather_rows)
    quadrant = assign_quadrants(signals.entropy, signals.divergence, entropy_threshold, divergence_threshold)
    quadrant = torch.where(signals.finite, quadrant, torch.zeros_like(quadrant))
    return SelectionContext(
        entropy_threshold=entropy_threshold,
        divergence_threshold=divergence_threshold,
        quadrant=quadrant,
        generator=generator,
        global_step=global_step,
        process_index=processes.process_index,
        num_processes=processes.num_processes,
        gather=processes.gather_rows,
        extras=extras or {},
        training=training,
    )
