"""What a plug-in (e.g. `trl_tip.sstoken`) adds to trl-tip besides its selection rule: signal providers and config
arguments.

A selector declares in `requires` the per-token signals it needs beyond the logits. The engine computes the logit ones
itself; any other name is supplied by a **signal provider**: an object the trainer builds when its selector requires
one of the provider's signals, that computes them on every micro-batch from what the trainer adapter already has
([`ProviderBatch`]: the forward view, the eligible positions, the teacher's hidden states), may add trainer callbacks
(e.g. an update after every optimizer step), and has a state the trainer saves with each checkpoint and restores on
resume. [`register_provider`] maps each signal name to its provider class.

A plug-in's config options live in one dataclass registered with [`register_arguments`]: `TIPConfig` and
`TIPDistillationConfig` inherit every registered one (so `TrlParser`, `trl-tip train --help-all` and YAML recipes see
its fields). Registration happens when the plug-in is imported, which `trl_tip/__init__.py` does before the configs are
defined (peft's pattern: each method registers itself from its own package).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


__all__ = [
    "PROVIDERS",
    "ProviderBatch",
    "SignalProvider",
    "plugin_arguments",
    "provided_signals",
    "register_arguments",
    "register_provider",
]


@dataclass
class ProviderBatch:
    """One micro-batch as a signal provider sees it, after the teacher's forward and before the student's.

    Attributes:
        requires: The signals the current selector requires (a provider computes those among its own).
        view: The adapter's `ForwardView` (`input_ids`, `attention_mask`, `loss_mask`, `prompt_mask`, `hidden_offset`,
            `model_kwargs`).
        seq_idx: Row of each eligible position, `(N,)`.
        pos_idx: Shifted position of each eligible position (its hidden state predicts `input_ids[:, pos_idx + 1]`).
        targets: The token each eligible position predicts, `(N,)`.
        model: The student as the trainer holds it (`trainer.model`: a `PeftModel` or `PreTrainedModel`).
        student: The unwrapped student (outside DDP/DeepSpeed wrappers).
        hidden: `hidden(unwrapped_model, view)`: the adapter's final hidden states `(B, L, d)` of a model on `view`,
            column `j` at shifted position `view.hidden_offset + j`.
        student_head: `() -> OutputHead` of the student (call it inside any weight swap: the head may be trained).
        teacher_hidden: The teacher's final hidden states at the eligible positions, `(N, d_t)`.
        teacher_head: The teacher's `OutputHead`.
        beta: `beta` of the training loss's generalized JSD.
        temperature: Temperature of the training loss.
        chunk_size: Positions per chunk of a logit computation (`tip_chunk_size`).
    """

    requires: frozenset[str]
    view: Any
    seq_idx: torch.Tensor
    pos_idx: torch.Tensor
    targets: torch.Tensor
    model: torch.nn.Module
    student: torch.nn.Module
    hidden: Callable[[torch.nn.Module, Any], torch.Tensor]
    student_head: Callable[[], Any]
    teacher_hidden: torch.Tensor
    teacher_head: Any
    beta: float
    temperature: float
    chunk_size: int

    @property
    def cols(self) -> torch.Tensor:
        """Column of each eligible position in the `(B, L, d)` hidden states `hidden` returns."""
        return self.pos_idx - self.view.hidden_offset


class SignalProvider:
    """Computes per-token signals a selector requires that need more than the logits (model forwards, hooks).

    Subclass it, list the signal names in `provides` and register the class with [`register_provider`]. The trainer
    builds one instance (`cls(trainer, args)`) at construction when its selector requires one of `provides`, and then
    calls, on every micro-batch (whatever the current selector requires; compute only `batch.requires & provides`):

    1. [`before_student`] after the teacher's forward, with no student graph alive (a provider may swap weights into
       the student for a no-grad forward);
    2. [`around_student`], entered around the student's forward (e.g. to capture a layer's inputs with a hook); the
       dict it yields is read after the block.

    A provider adds its own trainer callbacks (e.g. an update after each optimizer step) with `trainer.add_callback`
    in `__init__`. Its [`state_dict`] is written to `state_name` in every checkpoint (by the process that saves the
    model) and given back to [`load_state_dict`] on resume; [`state_missing`] is called instead when a checkpoint has
    none.

    Attributes:
        provides: The signal names this provider computes.
        state_name: File name of its state in a checkpoint; `None` for a provider without state.
        build_on_demand: Whether the trainer may build it when a later selector (e.g. a schedule phase) first requires
            one of its signals; `False` (default) when it must exist from the start (it records the model before
            training, or keeps a state across steps).
        unavailable_hint: Why its signals may be unavailable, appended to the error a selector that requires them
            gets when the trainer built no such provider.
    """

    provides: ClassVar[tuple[str, ...]] = ()
    state_name: ClassVar[str | None] = None
    build_on_demand: ClassVar[bool] = False
    unavailable_hint: ClassVar[str] = "it is built at construction, for the signals the trainer's selector requires"

    def __init__(self, trainer: Any, args: Any) -> None:
        self.trainer = trainer

    def before_student(self, batch: ProviderBatch) -> dict[str, torch.Tensor]:
        """Signals computed after the teacher's forward and before the student's (none by default)."""
        return {}

    def around_student(self, batch: ProviderBatch) -> AbstractContextManager[dict[str, torch.Tensor]]:
        """A context entered around the student's forward, yielding a dict filled by the end of the block."""
        return nullcontext({})

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint saves (with `state_name`)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what [`state_dict`] returned."""

    def state_missing(self, path: str) -> None:
        """Called on resume instead of [`load_state_dict`] when the checkpoint has no `path`."""


PROVIDERS: dict[str, type[SignalProvider]] = {}
_ARGUMENTS: list[type] = []


def register_provider(cls: type[SignalProvider]) -> type[SignalProvider]:
    """Registers `cls` as the provider of each signal in `cls.provides` (usable as a class decorator)."""
    if not cls.provides:
        raise ValueError(f"{cls.__name__}.provides is empty: list the signal names it computes.")
    for name in cls.provides:
        if PROVIDERS.get(name, cls) is not cls:
            raise ValueError(f"The signal {name!r} is provided by {PROVIDERS[name].__name__} already.")
    for name in cls.provides:
        PROVIDERS[name] = cls
    return cls


def provided_signals() -> frozenset[str]:
    """The signal names registered providers compute."""
    return frozenset(PROVIDERS)


def register_arguments(cls: type) -> type:
    """Registers a dataclass of config options that `TIPConfig` and `TIPDistillationConfig` inherit.

    Import the plug-in before `trl_tip.config` is first imported (`trl_tip/__init__.py` does it for the built-in
    ones); every field must have a default and a `metadata={"help": ...}`.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"register_arguments needs a dataclass, got {cls!r}.")
    missing = [f.name for f in dataclasses.fields(cls) if "help" not in f.metadata]
    if missing:
        raise ValueError(f"Fields of {cls.__name__} without metadata={{'help': ...}}: {missing}.")
    if "trl_tip.config" in sys.modules and cls not in _ARGUMENTS:
        raise RuntimeError(
            f"register_arguments({cls.__name__}) after trl_tip.config was imported: the configs would not have its "
            "fields. Register it from a module that trl_tip/__init__.py imports before trl_tip.config."
        )
    if cls not in _ARGUMENTS:
        _ARGUMENTS.append(cls)
    return cls


def plugin_arguments() -> tuple[type, ...]:
    """The registered argument dataclasses, in registration order."""
    return tuple(_ARGUMENTS)
