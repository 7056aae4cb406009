"""ssToken's callbacks: the EMA update of the history model and the attention-only warm-up."""

from __future__ import annotations

from transformers import TrainerCallback

from ..callbacks import SelectionScheduleCallback
from .history import ModelHistory


__all__ = ["HistoryEMACallback", "SSTokenWarmupCallback"]


class HistoryEMACallback(TrainerCallback):
    """Updates an EMA history model after every `update_interval`-th optimizer step.

    `TIPTrainer` adds one itself for `token_selection="sstoken"` with `sstoken_history="ema"`; the history is saved
    with each checkpoint and restored on resume by the trainer.

    Args:
        history ([`ModelHistory`]): The history model to update.
        update_interval (`int`, *optional*, defaults to `1`): Update after the optimizer steps whose number is a
            multiple of it.
    """

    def __init__(self, history: ModelHistory, update_interval: int = 1):
        if update_interval < 1:
            raise ValueError(f"sstoken_ema_update_interval must be >= 1, got {update_interval}.")
        self.history = history
        self.update_interval = int(update_interval)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("HistoryEMACallback needs the model passed to on_step_end.")
        if state.global_step % self.update_interval == 0:
            self.history.update(model)
        return control


class SSTokenWarmupCallback(SelectionScheduleCallback):
    """ssToken's attention-only warm-up, as one phase of a [`SelectionScheduleCallback`].

    For the first `warmup_ratio` of `max_steps` (or the first `warmup_steps` optimizer steps) the trainer's selector
    is replaced by `selector.attention_only()`: the same [`SSToken`] scoring by the prompt attention alone, sharing its
    budget, metrics and checkpoint state, and needing no history forward. Then the full score takes over. Progress is
    a function of the optimizer step, so a resumed run selects as an uninterrupted one. `TIPTrainer` adds one for
    `token_selection="sstoken"` (`sstoken_warmup_ratio`, default 0.2, or `sstoken_warmup_steps`).

    Args:
        selector ([`SSToken`]): The trainer's ssToken selector.
        warmup_ratio (`float`, *optional*): Share of `max_steps` in `[0, 1)`.
        warmup_steps (`int`, *optional*): Number of optimizer steps (instead of `warmup_ratio`).
    """

    def __init__(self, selector, warmup_ratio: float | None = None, warmup_steps: int | None = None):
        if (warmup_ratio is None) == (warmup_steps is None):
            raise ValueError("SSTokenWarmupCallback needs exactly one of warmup_ratio or warmup_steps.")
        if warmup_ratio is not None and not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"sstoken_warmup_ratio must be in [0, 1), got {warmup_ratio}.")
        if warmup_steps is not None and (int(warmup_steps) != warmup_steps or warmup_steps < 0):
            raise ValueError(f"sstoken_warmup_steps must be an integer >= 0, got {warmup_steps}.")
        if not callable(getattr(selector, "attention_only", None)):
            raise TypeError(f"SSTokenWarmupCallback needs an SSToken selector, got {selector!r}.")
        self.warmup_ratio = warmup_ratio
        self.warmup_steps = None if warmup_steps is None else int(warmup_steps)
        super().__init__(phases=[(warmup_ratio or 0.0, selector.attention_only())])

    def on_train_begin(self, args, state, control, **kwargs):
        if self.warmup_steps is not None:
            # global_step / max_steps < warmup_steps / max_steps  <=>  global_step < warmup_steps.
            until = min(1.0, self.warmup_steps / state.max_steps) if state.max_steps else 0.0
            self.phases = [(until, self.phases[0][1])]
        return control

    def __repr__(self) -> str:
        span = f"warmup_steps={self.warmup_steps}" if self.warmup_steps is not None else f"ratio={self.warmup_ratio}"
        return f"SSTokenWarmupCallback({span})"
