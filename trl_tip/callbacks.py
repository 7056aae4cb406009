"""Callbacks that observe or steer token selection: plain `TrainerCallback`s with one more hook.

A callback with an `on_selection(record, engine)` method, passed to `TIPTrainer` / `TIPDistillationTrainer` in
`callbacks=[...]` or added with `trainer.add_callback(...)`, receives the [`SelectionRecord`] of every micro-batch the
engine computes (what was selected, with its signals), and the engine itself — so it can change the selection for
the next steps. [`SelectionCallback`] is the base class that keeps the engine at hand; [`SelectionScheduleCallback`]
changes the keep ratio (or the rule) over training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from transformers import TrainerCallback

from .selection import AllTokens, TokenSelector


__all__ = ["SelectionCallback", "SelectionScheduleCallback", "linear_keep_ratio"]


class SelectionCallback(TrainerCallback):
    """A `TrainerCallback` that also observes the token-selection engine.

    Override `on_selection(record, engine)` to look at each micro-batch's selection (called for training and
    evaluation micro-batches; `record.training` tells which), and use `self.engine` in any `TrainerCallback` event to
    steer it: `self.engine.selector` is the rule in use (its attributes, e.g. `keep_ratio`, may be changed between
    steps), and `self.engine.set_selector(rule)` replaces it.
    """

    engine = None

    def bind_engine(self, engine) -> None:
        """Called by the trainer when the callback is registered."""
        self.engine = engine

    def on_selection(self, record, engine) -> None:
        """Called after every micro-batch with its [`SelectionRecord`]."""

    def _require_engine(self):
        if self.engine is None:
            raise RuntimeError(
                f"{type(self).__name__} is not bound to a trl-tip trainer: pass it to TIPTrainer / "
                "TIPDistillationTrainer(callbacks=[...]) or trainer.add_callback(...)."
            )
        return self.engine


def linear_keep_ratio(start: float, end: float, warmup: float = 0.0, anneal: float = 0.0) -> Callable[[float], float]:
    """A keep-ratio schedule over the training progress `p` in `[0, 1]`: `start` for `p < warmup`, then linear to
    `end` over the next `anneal` of training, then `end`.

    Example: `linear_keep_ratio(1.0, 0.2, warmup=0.1, anneal=0.3)` trains on every token for the first 10% of steps,
    then anneals to 20% by 40% of training.
    """
    for name, value in (("start", start), ("end", end)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name} keep ratio must be in (0, 1], got {value}.")
    for name, value in (("warmup", warmup), ("anneal", anneal)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a share of training in [0, 1], got {value}.")
    if warmup + anneal > 1.0:
        raise ValueError(f"warmup + anneal must be <= 1, got {warmup} + {anneal}.")

    def schedule(progress: float) -> float:
        if progress < warmup:
            return start
        if anneal == 0.0 or progress >= warmup + anneal:
            return end
        return start + (end - start) * (progress - warmup) / anneal

    return schedule


class SelectionScheduleCallback(SelectionCallback):
    """Changes the selection over training, at the start of every optimizer step.

    Either a keep-ratio schedule (`keep_ratio`: a function of the training progress in `[0, 1]`, e.g.
    [`linear_keep_ratio`]) applied to the trainer's rule, or phases of rules (`phases`: `(until, rule)` pairs, the
    rule used while the progress is below `until`; the trainer's own rule afterwards). Progress is
    `global_step / max_steps`; the schedule is a function of it, so a resumed run selects as an uninterrupted one.

    Args:
        keep_ratio (`Callable[[float], float]`, *optional*): Keep ratio as a function of the progress.
        phases (`Sequence[tuple[float, TokenSelector]]`, *optional*): `(until, rule)` pairs in increasing `until`.
        warmup_all_tokens (`float`, *optional*): Shortcut for `phases=[(warmup_all_tokens, AllTokens())]`: train on
            every token for that share of training first.
    """

    def __init__(
        self,
        keep_ratio: Callable[[float], float] | None = None,
        phases: Sequence[tuple[float, TokenSelector]] | None = None,
        warmup_all_tokens: float | None = None,
    ):
        if warmup_all_tokens is not None:
            if phases is not None:
                raise ValueError("Give phases or warmup_all_tokens, not both.")
            if not 0.0 <= warmup_all_tokens <= 1.0:
                raise ValueError(f"warmup_all_tokens must be a share of training in [0, 1], got {warmup_all_tokens}.")
            phases = [(warmup_all_tokens, AllTokens())]
        if (keep_ratio is None) == (phases is None):
            raise ValueError("SelectionScheduleCallback needs exactly one of keep_ratio, phases or warmup_all_tokens.")
        if phases is not None:
            bounds = [float(until) for until, _ in phases]
            if bounds != sorted(bounds) or any(not 0.0 <= b <= 1.0 for b in bounds):
                raise ValueError(f"phases must have increasing `until` values in [0, 1], got {bounds}.")
            for _, rule in phases:
                if not callable(rule):
                    raise TypeError(f"Each phase needs a selector (callable), got {rule!r}.")
        self.keep_ratio = keep_ratio
        self.phases = list(phases) if phases is not None else None
        self.base_selector = None

    def bind_engine(self, engine) -> None:
        super().bind_engine(engine)
        if self.base_selector is None:
            self.base_selector = engine.selector
            if self.keep_ratio is not None and not hasattr(self.base_selector, "keep_ratio"):
                raise ValueError(
                    f"A keep-ratio schedule needs a budgeted rule with a keep_ratio; {self.base_selector!r} has none."
                )

    def selector_at(self, progress: float):
        """The rule (with its keep ratio) in use at `progress`."""
        if self.phases is not None:
            for until, rule in self.phases:
                if progress < until:
                    return rule
            return self.base_selector
        ratio = float(self.keep_ratio(progress))
        if not 0.0 < ratio <= 1.0 or math.isnan(ratio):
            raise ValueError(
                f"The keep-ratio schedule returned {ratio} at progress {progress:.3f}; it must be in (0, 1]."
            )
        self.base_selector.keep_ratio = ratio
        return self.base_selector

    def on_step_begin(self, args, state, control, **kwargs):
        engine = self._require_engine()
        progress = state.global_step / state.max_steps if state.max_steps else 0.0
        selector = self.selector_at(progress)
        if selector is not engine.selector:
            engine.set_selector(selector)
        return control
