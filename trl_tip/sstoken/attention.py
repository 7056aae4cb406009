"""ssToken's semantic score: the attention mass each completion token puts on the prompt in one layer (the last).

Models run with SDPA or FlashAttention never materialise attention weights, and `output_attentions=True` would build
`(B, heads, T, T)` weights for every layer. Instead, a forward pre-hook captures the inputs of a decoder layer's
self-attention (the last by default, `sstoken_attention_layer`) during the student forward that runs anyway, and
[`prompt_attention_mass`] recomputes only the rows of the completion positions from them, a chunk of positions at a
time, with the layer's own q/k projections, q/k norms (if any), rotary embedding, GQA head repeat, causal + padding
(+ sliding-window) mask and softmax.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn


__all__ = [
    "AttentionInputs",
    "capture_attention_inputs",
    "capture_last_attention_inputs",
    "decoder_self_attentions",
    "prompt_attention_mass",
    "prompt_mass_from_qk",
    "self_attention_layer",
]


@dataclass
class AttentionInputs:
    """What the captured self-attention received: its module, normed hidden states `(B, T, d)` and `(cos, sin)`."""

    module: nn.Module
    hidden_states: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None


def decoder_self_attentions(lm: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a causal LM's decoder layers, in order (every module with a `self_attn`)."""
    layers = [m for m in lm.modules() if isinstance(getattr(m, "self_attn", None), nn.Module)]
    if not layers:
        raise ValueError(
            f"Cannot find decoder layers with a `self_attn` module in {type(lm).__name__}; the ssToken attention score "
            "supports Llama-style decoders (Llama, Qwen2/3, Mistral, Gemma, ...)."
        )
    return [layer.self_attn for layer in layers]


def self_attention_layer(lm: nn.Module, layer: int = -1) -> nn.Module:
    """The self-attention module of decoder layer `layer` (Python indexing: `-1` is the last) of a causal LM.

    Raises:
        ValueError: if `layer` is out of range (naming the allowed values), or the module cannot be recomputed.
    """
    attentions = decoder_self_attentions(lm)
    n = len(attentions)
    if int(layer) != layer or not -n <= layer < n:
        raise ValueError(
            f"sstoken_attention_layer={layer} is out of range for {type(lm).__name__} with {n} decoder layers; "
            f"allowed values: {-n}..{n - 1} (-1 is the last layer)."
        )
    attn = attentions[int(layer)]
    for name in ("q_proj", "k_proj"):
        if not isinstance(getattr(attn, name, None), nn.Module):
            raise ValueError(
                f"{type(attn).__name__} has no `{name}`; the ssToken attention score cannot recompute it."
            )
    if getattr(attn, "sinks", None) is not None:
        raise ValueError(
            f"{type(attn).__name__} uses attention sinks, which the ssToken attention score does not model."
        )
    return attn


@contextmanager
def capture_attention_inputs(lm: nn.Module, layer: int = -1) -> Iterator[AttentionInputs]:
    """Within the block, records the inputs of the first call of `lm`'s self-attention of layer `layer` (detached)."""
    attn = self_attention_layer(lm, layer)
    record = AttentionInputs(module=attn)

    def hook(module, args, kwargs):
        if record.hidden_states is not None:
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        position_embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if hidden is None or position_embeddings is None:
            raise ValueError(
                f"{type(module).__name__} was called without hidden_states and position_embeddings; the ssToken "
                "attention score needs a decoder that passes rotary embeddings to its attention."
            )
        record.hidden_states = hidden.detach()
        record.position_embeddings = tuple(t.detach() for t in position_embeddings)

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()


def capture_last_attention_inputs(lm: nn.Module):
    """[`capture_attention_inputs`] of the last decoder layer."""
    return capture_attention_inputs(lm, -1)


def prompt_mass_from_qk(
    query: torch.Tensor,
    key: torch.Tensor,
    allowed: torch.Tensor,
    prompt: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention mass on the prompt keys, averaged over heads, for a block of query rows.

    Args:
        query (`torch.Tensor`): Queries after rotary embedding, shape `(H, C, d)`.
        key (`torch.Tensor`): Keys after rotary embedding and GQA repeat, shape `(H, T, d)`.
        allowed (`torch.Tensor`): Boolean `(C, T)`, which keys each query may attend to.
        prompt (`torch.Tensor`): Boolean `(T,)`, which keys are prompt tokens.
        scaling (`float`): Score scale (usually `d ** -0.5`).
        softcap (`float`, *optional*): Attention-logit soft-capping (Gemma 2), if any.

    Returns:
        `torch.Tensor`: Float32 `(C,)`, `sum_{j in prompt} softmax(q k^T * scaling)[j]` averaged over heads.
    """
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed.unsqueeze(0), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # a row with no allowed key
    return (probs * prompt.to(probs.dtype)).sum(-1).mean(0)


@torch.no_grad()
def prompt_attention_mass(
    inputs: AttentionInputs,
    attention_mask: torch.Tensor,
    prompt_mask: torch.Tensor,
    seq_idx: torch.Tensor,
    query_pos: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Recomputes the captured layer's attention rows of `query_pos` and returns their mass on the prompt.

    Args:
        inputs ([`AttentionInputs`]): Captured by [`capture_attention_inputs`] during the forward.
        attention_mask (`torch.Tensor`): The `(B, T)` padding mask of the forward (1 = real token).
        prompt_mask (`torch.Tensor`): Boolean `(B, T)`, the prompt tokens of each row.
        seq_idx (`torch.Tensor`): Row of each query, shape `(N,)`.
        query_pos (`torch.Tensor`): Position of each query in its row, shape `(N,)`.
        chunk_size (`int`, *optional*, defaults to `1024`): Query rows recomputed at once.

    Returns:
        `torch.Tensor`: Float32 `(N,)`, the attention mass on the prompt averaged over heads.
    """
    if inputs.hidden_states is None:
        raise RuntimeError("The captured self-attention did not run inside capture_attention_inputs.")
    attn = inputs.module
    hidden = inputs.hidden_states
    cos, sin = inputs.position_embeddings
    head_dim = int(getattr(attn, "head_dim", 0)) or None
    rope = getattr(inspect.getmodule(type(attn)), "apply_rotary_pos_emb", None)
    if rope is None:
        raise ValueError(f"Cannot find apply_rotary_pos_emb next to {type(attn).__name__}.")
    scaling = float(getattr(attn, "scaling", 0.0)) or None
    softcap = getattr(attn, "attn_logit_softcapping", None)
    window = getattr(attn, "sliding_window", None)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    bsz, seq_len = hidden.shape[:2]
    out = torch.zeros(seq_idx.numel(), dtype=torch.float32, device=hidden.device)
    keys_pos = torch.arange(seq_len, device=hidden.device)
    for b in seq_idx.unique().tolist():
        rows = (seq_idx == b).nonzero(as_tuple=True)[0]
        h = hidden[b]
        key = attn.k_proj(h)
        head_dim = head_dim or key.size(-1) // attn.config.num_key_value_heads
        key = key.view(seq_len, -1, head_dim)
        if isinstance(k_norm, nn.Module):
            key = k_norm(key)
        key = key.transpose(0, 1).unsqueeze(0)  # (1, KV, T, d)
        cos_b = cos[b if cos.size(0) == bsz else 0].unsqueeze(0)
        sin_b = sin[b if sin.size(0) == bsz else 0].unsqueeze(0)
        _, key = rope(key, key, cos_b, sin_b)
        key = key[0]
        key_valid = attention_mask[b].bool()
        prompt = prompt_mask[b].bool() & key_valid
        scale = scaling or 1.0 / math.sqrt(head_dim)
        for start in range(0, rows.numel(), chunk_size):
            chunk = rows[start : start + chunk_size]
            pos = query_pos[chunk].long()
            query = attn.q_proj(h[pos]).view(pos.numel(), -1, head_dim)
            if isinstance(q_norm, nn.Module):
                query = q_norm(query)
            query = query.transpose(0, 1).unsqueeze(0)  # (1, H, C, d)
            query, _ = rope(query, query, cos_b[:, pos], sin_b[:, pos])
            query = query[0]
            n_rep = query.size(0) // key.size(0)
            allowed = (keys_pos[None, :] <= pos[:, None]) & key_valid[None, :]
            if window:
                allowed &= keys_pos[None, :] > pos[:, None] - int(window)
            out[chunk] = prompt_mass_from_qk(
                query, key.repeat_interleave(n_rep, dim=0), allowed, prompt, scale, softcap
            )
    return out
