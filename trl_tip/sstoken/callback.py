"""`HistoryEMACallback`: moves ssToken's EMA history model towards the student after optimizer steps."""

from __future__ import annotations

from transformers import TrainerCallback

from .history import ModelHistory


__all__ = ["HistoryEMACallback"]


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
