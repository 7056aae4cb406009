"""The history model of ssToken: the student before training (`fixed`, the paper's) or an EMA of its weights.

`fixed` (default) is the model before training, as in the ssToken paper (its reference code precomputes the base
model's per-token losses):

- for a PEFT/LoRA student whose adapter is still a no-op (every `lora_B` zero, as a freshly initialised LoRA), the base
  model with the adapter disabled (PEFT's `disable_adapter()`): no weight is copied at all;
- otherwise (a full-weight student, or an adapter that already changes the model: a trained adapter, a PiSSA/OLoRA
  initialisation), a frozen copy of the student's trainable weights at construction, in their own dtype.

`ema` keeps a float32 copy of the trainable weights, updated as `θ_his ← decay · θ_his + (1 − decay) · θ`. For a
PEFT/LoRA student only the adapter is copied (the frozen base is shared), so an EMA history costs the adapter's size.

A copy is run by swapping its weights into the student in place ([`ModelHistory.swapped_in`]) for one no-grad forward,
then swapping the student's weights back.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn


__all__ = ["HISTORY_DEVICES", "HISTORY_MODES", "ModelHistory", "adapter_is_noop"]

HISTORY_MODES = ("fixed", "ema")
HISTORY_DEVICES = ("same", "cpu")

# Trainable LoRA parameters; the adapter's output is zero while every `B` factor is zero.
_LORA_PARAM = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B)(\.|$)")
_LORA_B = re.compile(r"(^|\.)lora_(B|embedding_B)(\.|$)")


def adapter_is_noop(model: nn.Module) -> bool:
    """Whether `model` is a PEFT model whose trainable parameters are plain LoRA factors with every `B` factor zero.

    Then disabling the adapter gives exactly the current model, with no copy. A trained adapter, trainable weights
    outside the LoRA factors (`modules_to_save`, DoRA magnitudes, biases), or an initialisation that moves weights
    between base and adapter (PiSSA, OLoRA, ...: its `B` factors are non-zero) make it `False`.
    """
    if not callable(getattr(model, "disable_adapter", None)) or not hasattr(model, "peft_config"):
        return False
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable or not all(_LORA_PARAM.search(name) for name, _ in trainable):
        return False
    with torch.no_grad():
        return all(bool((p == 0).all()) for name, p in trainable if _LORA_B.search(name))


class ModelHistory:
    """ssToken's history model of a student: the student before training (`fixed`) or an EMA of its weights.

    Args:
        model (`torch.nn.Module`): The student (a `PeftModel` or a `PreTrainedModel`); its parameters with
            `requires_grad=True` at construction are tracked, by name.
        decay (`float`, *optional*, defaults to `0.9`): EMA decay `α` in `[0, 1)`; unused when `mode="fixed"`.
        mode (`str`, *optional*, defaults to `"fixed"`): `"fixed"` (the model at construction, never updated) or
            `"ema"` (updated by [`update`]).
        device (`str`, *optional*, defaults to `"same"`): Where a copy lives: `"same"` (each parameter's device) or
            `"cpu"`. Unused when the history is the adapter-disabled base model ([`uses_base_model`]).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9, mode: str = "fixed", device: str = "same"):
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
        self.uses_base_model = mode == "fixed" and adapter_is_noop(model)
        self.shadow: dict[str, torch.Tensor] = {}
        if not self.uses_base_model:
            self.shadow = {name: self._copy(p) for name, p in params.items()}

    def _home(self, p: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.device == "cpu" else p.device

    def _copy(self, p: torch.Tensor) -> torch.Tensor:
        # An EMA accumulates in float32 (small steps would vanish in bf16 rounding); a fixed copy keeps the weights.
        dtype = torch.float32 if self.mode == "ema" else p.dtype
        return p.detach().to(self._home(p), dtype=dtype, copy=True)

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
        """Number of values held by the copy (0 for the adapter-disabled base model)."""
        return sum(t.numel() for t in self.shadow.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the copy (0 for the adapter-disabled base model)."""
        return sum(t.numel() * t.element_size() for t in self.shadow.values())

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Restarts an EMA from the current weights of `model` (e.g. when a checkpoint has no saved history).

        A `fixed` history is the model at construction and is left as it is.
        """
        if self.mode == "fixed":
            return
        for name, p in self._params(model).items():
            self.shadow[name] = self._copy(p)
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
        """Makes `model` the history model for the duration of the block, then restores the student.

        With [`uses_base_model`], PEFT's `disable_adapter()` context; otherwise the copy's weights are copied into
        `model`, and the student's trainable weights wait meanwhile on the history's device (`same`: a transient copy
        on the accelerator; `cpu`: on the CPU). Run no backward inside the block and keep no graph through it.
        """
        if self.uses_base_model:
            with model.disable_adapter():
                yield model
            return
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
            "uses_base_model": self.uses_base_model,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores what [`state_dict`] returned; the mode and the tracked parameter names must match."""
        if state.get("mode", self.mode) != self.mode or bool(state.get("uses_base_model", False)) != (
            self.uses_base_model
        ):
            raise ValueError(
                f"The saved history model is of another kind (mode={state.get('mode')!r}, base model="
                f"{state.get('uses_base_model', False)}) than this trainer's ({self!r}); resume with the same "
                "sstoken_history and the same student."
            )
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            extra, missing = sorted(set(shadow) - set(self.shadow)), sorted(set(self.shadow) - set(shadow))
            raise ValueError(
                f"The saved history model tracks other parameters than this student (unexpected: {extra[:3]}, "
                f"missing: {missing[:3]}); was the checkpoint written with another model or adapter?"
            )
        for name, tensor in shadow.items():
            self.shadow[name] = tensor.to(self.shadow[name].device, self.shadow[name].dtype)
        self.num_updates = int(state.get("num_updates", 0))

    def __repr__(self) -> str:
        if self.uses_base_model:
            return "ModelHistory(mode='fixed', base model with the adapter disabled, no copy)"
        return (
            f"ModelHistory(mode={self.mode!r}, decay={self.decay}, device={self.device!r}, "
            f"parameters={self.num_parameters})"
        )
