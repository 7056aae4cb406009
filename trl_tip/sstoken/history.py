"""The history model of ssToken: an EMA (or a frozen copy) of the student's trainable weights.

Only the parameters with `requires_grad=True` are copied: for a PEFT/LoRA student that is the adapter, and the frozen
base weights are shared with the student, so the history model costs the adapter's size. For a full-weight student
the copy is the size of the model, in float32, on the student's device or on the CPU.

The history model is run by swapping its weights into the student in place ([`ModelHistory.swapped_in`]) for one
no-grad forward, then swapping the student's weights back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn


__all__ = ["HISTORY_DEVICES", "HISTORY_MODES", "ModelHistory"]

HISTORY_MODES = ("ema", "fixed")
HISTORY_DEVICES = ("same", "cpu")


class ModelHistory:
    """A float32 copy of a model's trainable parameters, updated as `θ_his ← decay · θ_his + (1 − decay) · θ`.

    Args:
        model (`torch.nn.Module`): The student (a `PeftModel` or a `PreTrainedModel`); its parameters with
            `requires_grad=True` at construction are tracked, by name.
        decay (`float`, *optional*, defaults to `0.9`): EMA decay `α` in `[0, 1)`; unused when `mode="fixed"`.
        mode (`str`, *optional*, defaults to `"ema"`): `"ema"` (updated by [`update`]) or `"fixed"` (the weights at
            construction, never updated).
        device (`str`, *optional*, defaults to `"same"`): Where the copy lives: `"same"` (each parameter's device) or
            `"cpu"`.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9, mode: str = "ema", device: str = "same"):
        if mode not in HISTORY_MODES:
            raise ValueError(f"sstoken_history={mode!r} is unknown; allowed values: {', '.join(HISTORY_MODES)}.")
        if device not in HISTORY_DEVICES:
            raise ValueError(
                f"sstoken_history_device={device!r} is unknown; allowed values: {', '.join(HISTORY_DEVICES)}."
            )
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"sstoken_ema_decay must be in [0, 1), got {decay}.")
        self.decay = float(decay)
        self.mode = mode
        self.device = device
        self.num_updates = 0
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("The student has no trainable parameter: there is nothing for a history model to track.")
        for name, p in params.items():
            if hasattr(p, "ds_id") or p.numel() == 0:
                raise ValueError(
                    f"Parameter {name} is sharded (DeepSpeed ZeRO-3 / FSDP); the ssToken history model needs whole "
                    "parameters on each process."
                )
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(self._home(p), dtype=torch.float32, copy=True) for name, p in params.items()
        }

    def _home(self, p: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.device == "cpu" else p.device

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [name for name in self.shadow if name not in params]
        if missing:
            raise ValueError(
                f"The model has no parameter {missing[0]} (and {len(missing) - 1} more) tracked by the history model; "
                "pass the same (unwrapped) model it was built from."
            )
        return {name: params[name] for name in self.shadow}

    @property
    def num_parameters(self) -> int:
        """Number of values held by the copy."""
        return sum(t.numel() for t in self.shadow.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the copy."""
        return sum(t.numel() * t.element_size() for t in self.shadow.values())

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Sets the copy to the current weights of `model` (e.g. when a checkpoint has no saved history)."""
        for name, p in self._params(model).items():
            self.shadow[name] = p.detach().to(self._home(p), dtype=torch.float32, copy=True)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards the current weights of `model` (nothing when `mode="fixed"`)."""
        if self.mode == "fixed":
            return
        for name, p in self._params(model).items():
            shadow = self.shadow[name]
            if shadow.device != self._home(p):
                shadow = self.shadow[name] = shadow.to(self._home(p))
            shadow.mul_(self.decay).add_(p.detach().to(shadow.device, torch.float32), alpha=1.0 - self.decay)
        self.num_updates += 1

    @contextmanager
    @torch.no_grad()
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Puts the history weights into `model` for the duration of the block, then restores the student's.

        The student's trainable weights are kept meanwhile on the history's device (`same`: a transient copy on the
        accelerator; `cpu`: on the CPU). Run no backward inside the block and keep no graph through it.
        """
        params = self._params(model)
        backup = {name: p.detach().to(self._home(p), copy=True) for name, p in params.items()}
        try:
            for name, p in params.items():
                p.data.copy_(self.shadow[name].to(p.device, p.dtype))
            yield model
        finally:
            for name, p in params.items():
                p.data.copy_(backup[name].to(p.device))
            del backup

    def state_dict(self) -> dict:
        """The copy and its settings, on the CPU (saved with each checkpoint)."""
        return {
            "shadow": {name: t.cpu() for name, t in self.shadow.items()},
            "decay": self.decay,
            "mode": self.mode,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores what [`state_dict`] returned; the tracked parameter names must match."""
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            extra, missing = sorted(set(shadow) - set(self.shadow)), sorted(set(self.shadow) - set(shadow))
            raise ValueError(
                f"The saved history model tracks other parameters than this student (unexpected: {extra[:3]}, "
                f"missing: {missing[:3]}); was the checkpoint written with another model or adapter?"
            )
        for name, tensor in shadow.items():
            self.shadow[name] = tensor.to(self.shadow[name].device, torch.float32)
        self.num_updates = int(state.get("num_updates", 0))

    def __repr__(self) -> str:
        return (
            f"ModelHistory(mode={self.mode!r}, decay={self.decay}, device={self.device!r}, "
            f"parameters={self.num_parameters})"
        )
