"""The distillation loss on kept positions only, computed from hidden states in chunks.

GKD builds the `(batch, seq, vocab)` logits of every position with grad. Here the caller gathers the final hidden
states of the kept positions, and the generalized JSD is computed a chunk of positions at a time: for a plain
linear `lm_head` the gradient of each chunk's logits is taken inside the forward and folded straight into the
gradients of the hidden states and of the head's weight (as Liger-Kernel's fused linear losses do), so at most one
chunk's logits are alive at any moment, in the forward and in the backward. Other heads (a LoRA-wrapped or sharded
`lm_head`) are run per chunk under activation checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .signals import generalized_jsd


__all__ = ["OutputHead", "kept_token_jsd"]


class OutputHead:
    """How a causal LM turns final hidden states into logits: its output embedding, then optional soft-capping.

    Args:
        module (`torch.nn.Module`): The model's output embedding (`model.get_output_embeddings()`).
        softcap (`float`, *optional*): `final_logit_softcapping` of the config (Gemma 2 style), if any.
    """

    def __init__(self, module: nn.Module, softcap: float | None = None):
        self.module = module
        self.softcap = softcap

    @classmethod
    def from_model(cls, model: nn.Module) -> OutputHead:
        """Builds the head of a (PEFT-unwrapped) `PreTrainedModel`."""
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head); it is not a causal LM.")
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return cls(head, getattr(config, "final_logit_softcapping", None))

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        """Applies the soft-capping, if any."""
        if self.softcap:
            return torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cap(self.module(hidden))

    @property
    def is_plain_linear(self) -> bool:
        """Whether the head is a plain `nn.Linear` whose weight is materialised (not sharded by ZeRO-3/FSDP)."""
        weight = getattr(self.module, "weight", None)
        return (
            type(self.module) is nn.Linear
            and isinstance(weight, torch.Tensor)
            and type(weight) in (torch.Tensor, nn.Parameter)
            and not hasattr(weight, "ds_id")
            and weight.numel() > 0
        )


def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


class _FusedLinearGeneralizedJSD(torch.autograd.Function):
    """Sum over positions of `weights * generalized_jsd(cap(hidden @ W.T + b), teacher_logits)`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, token_weights, head, teacher_head, beta, chunk_size):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        any_grad = need_h or need_w or need_b
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for sl in _chunks(hidden.size(0), chunk_size):
            h = hidden[sl]
            with torch.no_grad():
                teacher_logits = teacher_head(teacher_hidden[sl]).float()
                raw = F.linear(h, weight, bias).float()
            with torch.enable_grad():
                raw.requires_grad_(any_grad)
                per_token = generalized_jsd(head.cap(raw), teacher_logits, beta)
                chunk_loss = (per_token * token_weights[sl]).sum()
                grad_raw = torch.autograd.grad(chunk_loss, raw)[0] if any_grad else None
            total += chunk_loss.detach()
            del teacher_logits, per_token
            if grad_raw is None:
                continue
            grad_raw = grad_raw.to(weight.dtype)
            if need_h:
                grad_h[sl] = grad_raw @ weight
            if need_w:
                grad_w += (grad_raw.t() @ h.to(weight.dtype)).float()
            if need_b:
                grad_b += grad_raw.float().sum(0)
            del grad_raw, raw
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b = ctx.grads
        del ctx.grads
        if grad_h is not None:
            grad_h = grad_h * grad_output.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_output).to(ctx.dtypes[0])
        if grad_b is not None:
            grad_b = (grad_b * grad_output).to(ctx.dtypes[1])
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def kept_token_jsd(
    hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    head: OutputHead,
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    token_weights: torch.Tensor,
    beta: float = 0.5,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted sum of the per-token generalized JSD over the kept positions, with grad, in chunks.

    Args:
        hidden (`torch.Tensor`): Student final hidden states of the kept positions, shape `(K, d)`, with grad.
        teacher_hidden (`torch.Tensor`): Teacher final hidden states of the same positions, shape `(K, d_t)`.
        head ([`OutputHead`]): The student's output head.
        teacher_head (`Callable`): Maps teacher hidden states to logits (run under `no_grad`).
        token_weights (`torch.Tensor`): Weight of each position, shape `(K,)` (1 for a plain keep-mask).
        beta (`float`, *optional*, defaults to `0.5`): Generalized JSD interpolation coefficient, as in GKD.
        chunk_size (`int`, *optional*, defaults to `1024`): Positions per chunk.

    Returns:
        `torch.Tensor`: Scalar float32 `sum_k token_weights[k] * jsd_k`, differentiable with respect to `hidden`
        and the head's parameters.
    """
    token_weights = token_weights.detach().float()
    if head.is_plain_linear:
        module = head.module
        return _FusedLinearGeneralizedJSD.apply(
            hidden, module.weight, module.bias, teacher_hidden, token_weights, head, teacher_head, beta, chunk_size
        )

    def chunk_loss(h: torch.Tensor, t_hidden: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher_head(t_hidden).float()
        return (generalized_jsd(head(h).float(), teacher_logits, beta) * w).sum()

    total = hidden.new_zeros((), dtype=torch.float32)
    if hidden.size(0) == 0:
        return total + hidden.sum() * 0.0
    for sl in _chunks(hidden.size(0), chunk_size):
        if torch.is_grad_enabled():
            total = total + checkpoint(
                chunk_loss, hidden[sl], teacher_hidden[sl], token_weights[sl], use_reentrant=False
            )
        else:
            total = total + chunk_loss(hidden[sl], teacher_hidden[sl], token_weights[sl])
    return total
