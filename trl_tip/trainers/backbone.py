"""What trl-tip reads of a causal LM: the `PreTrainedModel` inside the wrappers, its decoder stack and final hidden
states (the loss is computed from those, never from full logits), and which PEFT set-ups that allows."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from transformers.utils import is_peft_available


if is_peft_available():
    from peft import PeftModel

if TYPE_CHECKING:
    from .common import ForwardView


__all__ = ["backbone_hidden", "backbone_of", "causal_lm", "check_peft_student", "place_teacher"]

logger = logging.getLogger(__name__)


def causal_lm(model: nn.Module) -> nn.Module:
    """The `PreTrainedModel` inside accelerate/DeepSpeed/DDP/FSDP and PEFT wrappers."""
    while hasattr(model, "module") and not hasattr(model, "get_output_embeddings"):
        model = model.module
    if is_peft_available() and isinstance(model, PeftModel):
        model = model.get_base_model()
    return model


def backbone_of(lm: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM, whose output is the final (normed) hidden state fed to `lm_head`."""
    backbone = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    if backbone is None or backbone is lm:
        backbone = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"Cannot find the decoder of {type(lm).__name__}; trl-tip needs a causal LM with lm_head.")
    return backbone


def backbone_hidden(unwrapped: nn.Module, view: ForwardView) -> torch.Tensor:
    """Final hidden states `(B, T - 1, d)` of a causal LM on `view` (the last position predicts nothing trained)."""
    out = backbone_of(causal_lm(unwrapped))(
        input_ids=view.input_ids, attention_mask=view.attention_mask, use_cache=False, **view.model_kwargs
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[:, :-1]


def check_peft_student(model: nn.Module) -> None:
    """Refuses PEFT set-ups the hidden-state loss cannot train correctly (as TRL's `DistillationTrainer` does).

    Prompt-learning methods (prompt tuning, prefix tuning, P-tuning) prepend virtual tokens or key/values inside
    `PeftModel.forward`, which the loss bypasses by running the decoder stack directly: the completion positions it
    reads would be the wrong ones. (An adapter on `lm_head` works with trl-tip's loss, but TRL's trainers refuse it
    before this check.)
    """
    if not (is_peft_available() and isinstance(model, PeftModel)):
        return
    from peft import PromptLearningConfig

    if any(isinstance(cfg, PromptLearningConfig) for cfg in model.peft_config.values()):
        methods = sorted({type(cfg).__name__ for cfg in model.peft_config.values()})
        raise ValueError(
            f"Prompt-learning PEFT methods are not supported (got {', '.join(methods)}): they prepend virtual tokens "
            "inside PeftModel.forward, so the completion positions the token-level loss reads would be shifted. Use "
            "a weight adapter such as LoRA (peft.LoraConfig) instead."
        )


def place_teacher(teacher: nn.Module | None, accelerator) -> None:
    """Moves a teacher left off the device under FSDP to the process's device (whole, not sharded).

    Under FSDP, accelerate prepares the teacher (`prepare_model(..., evaluation_mode=True)`, which TRL's trainers call)
    without placing it, so a teacher passed as a module built on the CPU stays there and its first forward fails on
    CUDA inputs (found on an H100 with FSDP2). Under DDP the same call moves it to the device; this does what DDP does.
    A teacher with a `device_map` (TRL loads one given by name so), or with sharded (DTensor) parameters, is left as is.
    """
    from accelerate.utils import DistributedType

    if teacher is None or accelerator.distributed_type != DistributedType.FSDP:
        return
    model = accelerator.unwrap_model(teacher)
    if getattr(model, "hf_device_map", None):
        return
    tensors = [*model.parameters(), *model.buffers()]
    if any(type(t).__name__ == "DTensor" for t in tensors):
        return
    device = torch.device(accelerator.device)
    if all(t.device == device for t in tensors):
        return
    model.to(device)
    logger.info(f"The teacher was not on {device} under FSDP (accelerate does not place it); moved it there, whole.")
