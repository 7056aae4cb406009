"""ssToken's per-token signals as signal providers (`trl_tip.plugins`): the history model's losses (`history_nll`,
`history_divergence`) and the prompt attention (`prompt_attention`).

The trainer builds a provider when its selector requires one of its signals and calls it on every micro-batch; the
history provider also owns the history model's EMA updates (a [`HistoryEMACallback`]), its checkpoint file
(`sstoken_history.pt`) and the attention-only warm-up of an [`SSToken`] selector (REL is zero while the student is
still its history model).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.utils import logging

from ..plugins import ProviderBatch, SignalProvider, register_provider
from ..signals import history_token_losses
from .attention import capture_attention_inputs, prompt_attention_mass, self_attention_layer
from .callback import HistoryEMACallback, SSTokenWarmupCallback
from .history import ModelHistory
from .selector import PROMPT_ATTENTION, SSTOKEN_DEFAULTS, SSTOKEN_LOSSES, SSToken, history_requirement


__all__ = ["HISTORY_STATE_NAME", "HistoryProvider", "PromptAttentionProvider", "history_model"]

logger = logging.get_logger(__name__)

HISTORY_STATE_NAME = "sstoken_history.pt"


def _option(args: Any, name: str) -> Any:
    """An `sstoken_*` option, or its default when unset (a custom selector under another `token_selection`)."""
    value = getattr(args, name, None)
    return SSTOKEN_DEFAULTS[name] if value is None else value


def _student_lm(trainer: Any) -> torch.nn.Module:
    from ..trainers.backbone import causal_lm  # not at import: the trainers import the configs, built after plug-ins

    return causal_lm(trainer.accelerator.unwrap_model(trainer.model))


@register_provider
class HistoryProvider(SignalProvider):
    """The history model's per-token losses: `history_nll` (NLL of the sampled token) and `history_divergence` (the
    generalized JSD to the teacher), computed in eval mode without grad, with the history weights swapped into the
    student ([`ModelHistory`]).

    Built from `sstoken_history` (`fixed`: the student before training; `ema`: an EMA updated by a
    [`HistoryEMACallback`] it adds), `sstoken_ema_decay`, `sstoken_ema_update_interval` and `sstoken_history_device`
    (their defaults for a custom selector). For an [`SSToken`] selector with `gamma > 0` it also adds the
    attention-only warm-up ([`SSTokenWarmupCallback`], `sstoken_warmup_ratio` / `sstoken_warmup_steps`).
    """

    provides = tuple(history_requirement(loss) for loss in SSTOKEN_LOSSES)
    state_name = HISTORY_STATE_NAME
    unavailable_hint = (
        "the ssToken history model is built at construction only for a selector that needs it (token_selection="
        "'sstoken' with sstoken_gamma > 0)"
    )

    def __init__(self, trainer: Any, args: Any) -> None:
        super().__init__(trainer, args)
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if trainer.is_fsdp_enabled or is_deepspeed_zero3_enabled():
            raise ValueError(
                "The ssToken history model swaps whole parameters into the student, which FSDP and DeepSpeed ZeRO-3 "
                "shard; use DDP or ZeRO-1/2, or a selector without a history model (sstoken_gamma=0)."
            )
        history = ModelHistory(
            trainer.model,
            decay=_option(args, "sstoken_ema_decay"),
            mode=_option(args, "sstoken_history"),
            device=_option(args, "sstoken_history_device"),
        )
        if history.uses_base_model and "sstoken_history_device" in getattr(args, "_sstoken_given_options", ()):
            raise ValueError(
                "sstoken_history_device is not used: the history model of this PEFT student is its base model with "
                "the adapter disabled, which copies no weight. Leave sstoken_history_device unset, or use "
                "sstoken_history='ema' (an adapter-sized copy)."
            )
        self.history = history
        self._reset_after_load = False
        if history.mode == "ema":
            trainer.add_callback(HistoryEMACallback(history, _option(args, "sstoken_ema_update_interval")))
        logger.info(f"ssToken history model: {history!r}, {history.nbytes / 2**20:.1f} MiB.")
        selector = trainer.selector
        if isinstance(selector, SSToken) and selector.gamma > 0:
            ratio, steps = getattr(args, "sstoken_warmup_ratio", None), getattr(args, "sstoken_warmup_steps", None)
            warmup = None
            if steps:
                warmup = SSTokenWarmupCallback(selector, warmup_steps=steps)
            elif ratio:
                warmup = SSTokenWarmupCallback(selector, warmup_ratio=ratio)
            if warmup is not None:
                # The warm-up selects by the prompt attention: check its layer now rather than at the first step.
                self_attention_layer(_student_lm(trainer), _option(args, "sstoken_attention_layer"))
                trainer.add_callback(warmup)

    def before_student(self, batch: ProviderBatch) -> dict[str, torch.Tensor]:
        if self._reset_after_load:
            # Resumed from a checkpoint without a saved history: restart it from the resumed weights, which
            # Trainer, DeepSpeed or FSDP have loaded by the first loss.
            self.history.reset(batch.model)
            self._reset_after_load = False
        names = sorted(batch.requires & set(self.provides))
        if not names:
            return {}
        kinds = tuple(name[len("history_") :] for name in names)
        student = batch.student
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad(), self.history.swapped_in(batch.model):
                hidden = batch.hidden(student, batch.view)[batch.seq_idx, batch.cols]
                # The head may be trained (or tied to trained embeddings): project inside the swap.
                losses = history_token_losses(
                    hidden,
                    batch.targets,
                    batch.student_head(),
                    kinds,
                    teacher_hidden=batch.teacher_hidden,
                    teacher_head=batch.teacher_head,
                    beta=batch.beta,
                    chunk_size=batch.chunk_size,
                    temperature=batch.temperature,
                )
        finally:
            student.train(was_training)
        return {f"history_{kind}": value for kind, value in losses.items()}

    def state_dict(self) -> dict[str, Any]:
        return self.history.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.load_state_dict(state)

    def state_missing(self, path: str) -> None:
        logger.warning(
            f"{path} is missing: an EMA ssToken history restarts from the resumed weights (selections differ from an "
            "uninterrupted run); a fixed one keeps the weights this trainer was built with."
        )
        self._reset_after_load = True


@register_provider
class PromptAttentionProvider(SignalProvider):
    """`prompt_attention`: the attention mass each completion token puts on the prompt in decoder layer
    `sstoken_attention_layer` of the student (default the last), recomputed from that layer's inputs captured during
    the student's forward ([`prompt_attention_mass`]). Stateless, so it is built when first needed."""

    provides = (PROMPT_ATTENTION,)
    build_on_demand = True

    def __init__(self, trainer: Any, args: Any) -> None:
        super().__init__(trainer, args)
        self.layer = _option(args, "sstoken_attention_layer")
        self_attention_layer(_student_lm(trainer), self.layer)  # refuses a bad layer or architecture now

    @contextmanager
    def around_student(self, batch: ProviderBatch) -> Iterator[dict[str, torch.Tensor]]:
        out: dict[str, torch.Tensor] = {}
        if PROMPT_ATTENTION not in batch.requires:
            yield out
            return
        from ..trainers.backbone import causal_lm

        with capture_attention_inputs(causal_lm(batch.student), self.layer) as inputs:
            yield out
        view = batch.view
        out[PROMPT_ATTENTION] = prompt_attention_mass(
            inputs,
            view.attention_mask,
            view.prompt_mask,
            batch.seq_idx,
            batch.pos_idx + 1,
            chunk_size=batch.chunk_size,
        )


def history_model(trainer: Any) -> ModelHistory | None:
    """The ssToken history model of a trl-tip trainer, or `None` if its selector needs none."""
    for provider in getattr(trainer, "tip_providers", {}).values():
        if isinstance(provider, HistoryProvider):
            return provider.history
    return None
