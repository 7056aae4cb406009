"""The selector protocol and the helpers every selection rule shares."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from ..signals import DIVERGENCES, SIGNAL_NAMES, STUDENT_SIGNALS, TokenSignals
from .budget import gumbel_keys


QUADRANTS = ("Q1", "Q2", "Q3", "Q4")

__all__ = [
    "QUADRANTS",
    "SelectionContext",
    "TokenSelector",
    "assign_quadrants",
    "budget",
    "planned_kept",
    "reads_teacher_signals",
    "required_signals",
    "sample_without_replacement",
    "top_k_mask",
    "validate_selection",
]


@dataclass
class SelectionContext:
    """What a selector may use besides the signals of the current micro-batch.

    Attributes:
        entropy_threshold: Entropy split of the quadrants (the same on every process).
        divergence_threshold: Divergence split of the quadrants (the same on every process).
        quadrant: Quadrant id of each position, shape `(N,)`, values in `{1, 2, 3, 4}` (0 for non-finite positions).
        generator: Seeded CPU generator, to draw from for any randomness (reproducible runs).
        global_step: Optimizer step the micro-batch belongs to.
        process_index: Rank of this process.
        num_processes: Number of processes.
        gather: Concatenates a 1-D tensor over all processes (identity on one process); use it to compute
            thresholds that every rank must share.
        extras: Extra per-token inputs of shape `(N,)` that the selector asked for in its `requires` attribute
            (`"forward_kl"`, `"reverse_kl"`, `"jsd"` from the signals pass; `"history_nll"`, `"history_divergence"`,
            `"prompt_attention"` from the trainer); computed only when asked.
        training: Whether the micro-batch is a training one (selectors with metrics accumulate only then).
    """

    entropy_threshold: float | torch.Tensor
    divergence_threshold: float | torch.Tensor
    quadrant: torch.Tensor
    generator: torch.Generator
    global_step: int = 0
    process_index: int = 0
    num_processes: int = 1
    gather: object = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    training: bool = True

    def gather_values(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenates `values` over all processes (identity on one process)."""
        return values if self.gather is None else self.gather(values)


@runtime_checkable
class TokenSelector(Protocol):
    """A selection rule: maps the per-token signals to a keep-mask or to non-negative weights.

    A selector is called once per micro-batch with the signals of the `N` eligible positions and returns either a
    boolean tensor of shape `(N,)` (kept positions) or a floating tensor of shape `(N,)` of non-negative finite
    weights (positions with weight 0 are dropped). Positions with `signals.finite == False` are dropped whatever the
    selector returns.

    The loss is `Σ weight · loss` over the kept tokens divided by a denominator fixed for the whole optimizer step
    before any forward: the sum over the step's rollouts of [`planned_kept`] (the selector's `planned_kept(lengths)`
    if it has one, the number of tokens a rule plans to keep of rollouts of `lengths` eligible tokens; else every
    eligible token). So the loss of a step does not depend on how its rows are split into micro-batches or processes.

    A selector declares what it reads in a `requires` attribute: the signals of the logits it reads (`TokenSignals`
    fields such as `"entropy"` or `"divergence"`, and `"finite"`; a selector that names none of them is taken to read
    them all, see [`required_signals`]), further divergences (`"jsd"`, `"reverse_kl"`, `"forward_kl"`) and inputs
    computed by the trainer (e.g. ssToken's); the last two it receives in `context.extras`, computed only when
    required. A selector that reads no signal of the teacher (`requires={"entropy", "finite"}`) lets
    `teacher_signals="kept"` run the teacher's head on its kept tokens only. A selector that keeps every finite token with weight 1 may say so
    with `keeps_every_token = True`: it is then not called, and its loss is taken in the signals pass.

    A selector that needs state across steps keeps it itself or in a `TrainerCallback`; a selector with a
    `state_dict()` / `load_state_dict()` pair is saved in and restored from checkpoints by `TIPTrainer`.
    """

    def __call__(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor: ...


# The names a rule may list in `requires` for the signals of the logits it reads (`finite` included, so that a rule
# reading nothing but the finiteness can say so).
LOGIT_SIGNAL_NAMES = frozenset({*SIGNAL_NAMES, *DIVERGENCES, "finite"})
TOKEN_SIGNALS = frozenset({*SIGNAL_NAMES, "finite"})


def required_signals(selector) -> frozenset[str]:
    """What `selector` reads, from its `requires`: as declared when that names a signal of the logits (a
    `TokenSignals` field, or `finite`); otherwise (no `requires`, or only further divergences and inputs computed by
    the trainer) every `TokenSignals` signal besides what it lists: a rule that does not declare them reads them all."""
    requires = frozenset(getattr(selector, "requires", ()))
    if requires & TOKEN_SIGNALS:
        return requires
    return requires | TOKEN_SIGNALS


def reads_teacher_signals(selector) -> bool:
    """Whether `selector` reads a signal of the teacher's logits (anything but the student's entropy and
    log-probability and the finiteness): if not, the teacher's head need not run on the tokens it drops."""
    return bool((required_signals(selector) & LOGIT_SIGNAL_NAMES) - {*STUDENT_SIGNALS, "finite"})


def assign_quadrants(
    entropy: torch.Tensor,
    divergence: torch.Tensor,
    entropy_threshold: float | torch.Tensor,
    divergence_threshold: float | torch.Tensor,
) -> torch.Tensor:
    """Quadrant id of each token: 1 = high H & high D, 2 = high H & low D, 3 = low H & high D, 4 = low H & low D.

    "High" means greater than or equal to the threshold.

    Args:
        entropy (`torch.Tensor`): Entropies of shape `(N,)`.
        divergence (`torch.Tensor`): Divergences of shape `(N,)`.
        entropy_threshold (`float`): Entropy split.
        divergence_threshold (`float`): Divergence split.

    Returns:
        `torch.Tensor`: Long tensor of shape `(N,)` with values in `{1, 2, 3, 4}`.
    """
    high_h = entropy >= entropy_threshold
    high_d = divergence >= divergence_threshold
    return torch.where(high_h, torch.where(high_d, 1, 2), torch.where(high_d, 3, 4)).long()


def budget(n: int, keep_ratio: float) -> int:
    """Number of tokens a ratio keeps out of `n` with `budget_scope="batch"`: `keep_ratio * n` rounded half up."""
    return min(n, int(math.floor(keep_ratio * n + 0.5 + 1e-9)))


def top_k_mask(
    scores: torch.Tensor, k: int, candidates: torch.Tensor | None = None, num_candidates: int | None = None
) -> torch.Tensor:
    """Boolean mask of the `k` highest `scores` among `candidates` (all positions if `None`); ties by lower index.

    Args:
        scores (`torch.Tensor`): Scores of shape `(N,)`.
        k (`int`): Number of positions to keep (at most the number of candidates).
        candidates (`torch.Tensor`, *optional*): Boolean mask of the positions that may be kept.
        num_candidates (`int`, *optional*): `candidates.sum()` if the caller knows it (saves a device sync).
    """
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if candidates is not None:
        if num_candidates is None:
            num_candidates = int(candidates.sum())
        k = min(k, num_candidates)
        scores = torch.where(candidates, scores.double(), torch.full_like(scores, float("-inf"), dtype=torch.float64))
    k = min(k, scores.numel())
    if k <= 0:
        return mask
    # A stable descending sort makes the choice among equal scores deterministic.
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    mask[order] = True
    return mask


def sample_without_replacement(
    weights: torch.Tensor,
    k: int,
    generator: torch.Generator,
    candidates: torch.Tensor | None = None,
    num_candidates: int | None = None,
) -> torch.Tensor:
    """Draws `k` positions without replacement with probability proportional to `weights` (Gumbel top-k).

    Positions of weight 0 are drawn only once every positive-weight position is taken, uniformly among themselves.

    Args:
        weights (`torch.Tensor`): Non-negative weights of shape `(N,)`.
        k (`int`): Number of positions to draw.
        generator (`torch.Generator`): CPU generator the draw comes from.
        candidates (`torch.Tensor`, *optional*): Boolean mask of the positions that may be drawn (all if `None`);
            e.g. the finite positions, so that a budget larger than the positive-weight positions is filled with
            zero-weight finite positions, never with non-finite ones.
        num_candidates (`int`, *optional*): `candidates.sum()` if the caller knows it (saves a device sync).

    Returns:
        `torch.Tensor`: Boolean mask of shape `(N,)` with `min(k, number of candidates)` positions set.
    """
    keys = gumbel_keys(weights, generator)
    return top_k_mask(keys, k, candidates, num_candidates)


def planned_kept(selector, lengths: torch.Tensor) -> torch.Tensor:
    """The loss denominator a selector plans for rollouts of `lengths` eligible tokens (float64 `(R,)`).

    `selector.planned_kept(lengths)` if the selector defines it (budgeted rules: their budget), else `lengths`: a rule
    whose kept share depends on the data (quadrant subsets, custom weights) is normalised by the eligible tokens,
    the only count known before the forward; its loss is the all-token loss with the dropped tokens counting 0.

    Raises:
        ValueError: if `selector.planned_kept` returns a tensor of another shape, or negative or non-finite values.
    """
    method = getattr(selector, "planned_kept", None)
    if method is None:
        return lengths.double()
    planned = method(lengths)
    if not isinstance(planned, torch.Tensor) or tuple(planned.shape) != tuple(lengths.shape):
        raise ValueError(
            f"{selector!r}.planned_kept must return a tensor of shape {tuple(lengths.shape)} (one count per rollout)."
        )
    planned = planned.double()
    if planned.numel() and (not torch.isfinite(planned).all() or (planned < 0).any()):
        raise ValueError(f"{selector!r}.planned_kept returned negative or non-finite counts.")
    return planned


def validate_selection(selection: torch.Tensor, n: int, name: str = "selector") -> torch.Tensor:
    """Checks what a selector returned and turns it into float weights of shape `(n,)`.

    Raises:
        TypeError: if it is not a tensor, or neither boolean nor floating.
        ValueError: if its shape is not `(n,)`, or a weight is negative or not finite.
    """
    if not isinstance(selection, torch.Tensor):
        raise TypeError(f"{name} must return a torch.Tensor of shape ({n},), got {type(selection).__name__}.")
    if tuple(selection.shape) != (n,):
        raise ValueError(
            f"{name} returned a tensor of shape {tuple(selection.shape)}; expected ({n},), one value per eligible "
            "completion token."
        )
    if selection.dtype == torch.bool:
        return selection.float()
    if not selection.is_floating_point():
        raise TypeError(
            f"{name} returned dtype {selection.dtype}; expected torch.bool (keep-mask) or a floating dtype (weights)."
        )
    if n and (not torch.isfinite(selection).all() or (selection < 0).any()):
        raise ValueError(f"{name} returned weights that are negative or not finite; weights must be finite and >= 0.")
    return selection.float()
