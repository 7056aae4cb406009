"""The chunk driver: per-token signals and the distillation loss on kept positions, from hidden states in chunks.

[`chunked_pass`] is the one route from final hidden states to per-token values: it feeds each chunk's logits to the
one per-chunk function of `trl_tip.fused` and returns the declared signals ([`SignalPlan`]) and/or the weighted loss;
[`compute_token_signals`] and [`kept_token_jsd`] are its two single-purpose forms. GKD builds the `(batch, seq, vocab)` logits of every position with grad. Here the caller gathers the final hidden
states of the kept positions, and the generalized JSD is computed a chunk of positions at a time: for a plain
linear `lm_head` the gradient of each chunk's logits is taken inside the forward and folded straight into the
gradients of the hidden states and of the head's weight (as Liger-Kernel's fused linear losses do), so at most one
chunk's logits are alive at any moment, in the forward and in the backward. Other heads (a LoRA-wrapped or sharded
`lm_head`) are run per chunk under activation checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .fused import chunk_signals, jsd_and_grad, student_signals
from .signals import (
    DIVERGENCES,
    SIGNAL_NAMES,
    STUDENT_SIGNALS,
    TokenSignals,
    chunk_slices,
    divergence_from_logits,
    generalized_jsd,
)


__all__ = [
    "LOSS_BACKENDS",
    "OutputHead",
    "SignalPlan",
    "chunked_pass",
    "compute_token_signals",
    "gathered_heads",
    "kept_token_jsd",
    "logit_scale_of",
]

LOSS_BACKENDS = ("auto", "fused", "trl")
TRL_VOCAB_TILE = 32768  # trl.kernels.chunked_divergence.VOCAB_CHUNK_SIZE


def logit_scale_of(config) -> float:
    """The multiplier a causal LM applies to its `lm_head` output before any soft-capping (1 for most models).

    As TRL's `DistillationTrainer` reads it: `logit_scale` (Cohere), `output_multiplier`, `lm_head_multiplier`
    (Falcon-H1), or `1 / logits_scaling` (Granite, MiniCPM3; HyperCLOVA X multiplies by it).
    """
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


class OutputHead:
    """How a causal LM turns final hidden states into logits: its output embedding, a scale, optional soft-capping.

    `logits = softcap * tanh(scale * lm_head(h) / softcap)` (without soft-capping: `scale * lm_head(h)`), as the
    model's own forward computes them.

    Args:
        module (`torch.nn.Module`): The model's output embedding (`model.get_output_embeddings()`).
        softcap (`float`, *optional*): `final_logit_softcapping` of the config (Gemma 2 style), if any.
        scale (`float`, *optional*, defaults to `1.0`): Multiplier of the raw logits (see [`logit_scale_of`]).
    """

    def __init__(
        self,
        module: nn.Module,
        softcap: float | None = None,
        scale: float = 1.0,
        compute_dtype: torch.dtype | None = None,
    ):
        self.module = module
        self.softcap = softcap
        self.scale = float(scale)
        # Under FSDP2 a sharded head's weight is a DTensor: gather it once here (per micro-batch), not once per chunk.
        # `full_tensor()` is differentiable, so the student's gradient is reduce-scattered back to its shards. The
        # shards hold the parameters' own dtype, not FSDP2's mixed-precision compute dtype (which the hidden states
        # are in), so a gathered weight is cast to `compute_dtype` once, as FSDP2's unshard would have (differentiable).
        self.weight = _materialized(getattr(module, "weight", None), compute_dtype)
        self.bias = _materialized(getattr(module, "bias", None), compute_dtype)

    @classmethod
    def from_model(cls, model: nn.Module, compute_dtype: torch.dtype | None = None) -> OutputHead:
        """Builds the head of a (PEFT-unwrapped) `PreTrainedModel`; `compute_dtype` (the hidden states' dtype) is the
        dtype a weight gathered from FSDP2 shards is cast to."""
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head); it is not a causal LM.")
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return cls(head, getattr(config, "final_logit_softcapping", None), logit_scale_of(config), compute_dtype)

    @property
    def transforms(self) -> bool:
        """Whether the raw `lm_head` output is scaled or soft-capped."""
        return bool(self.softcap) or self.scale != 1.0

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        """Applies the scale and the soft-capping, if any, to raw `lm_head` outputs."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            return torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def cap_grad(self, capped: torch.Tensor) -> torch.Tensor | float:
        """`d cap(x) / d x` as a function of `cap(x)`: `scale * (1 - (cap(x) / softcap)^2)`."""
        factor = self.scale
        if self.softcap:
            return factor * (1.0 - (capped / self.softcap).square())
        return factor

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.is_plain_linear:
            return self.cap(F.linear(hidden, self.weight, self.bias))
        return self.cap(self.module(hidden))

    @property
    def is_plain_linear(self) -> bool:
        """Whether the head is a plain `nn.Linear` whose weight is materialised here (gathered from FSDP2 shards, or
        inside a ZeRO-3 gather, see [`gathered_heads`])."""
        weight = self.weight
        return (
            is_linear_layer(self.module)
            and type(weight) in (torch.Tensor, nn.Parameter)
            and weight.numel() > 0
            and weight.dim() == 2
        )

    def parameters(self) -> list[torch.Tensor]:
        """The head's weight and bias, as stored by the module (for a ZeRO-3 gather)."""
        return [p for p in (getattr(self.module, "weight", None), getattr(self.module, "bias", None)) if p is not None]


def is_linear_layer(module: nn.Module) -> bool:
    """Whether `module` computes `nn.Linear`'s forward: an `nn.Linear`, or one whose class a wrapper swapped without
    changing the forward (FSDP2's `fully_shard` turns `nn.Linear` into `FSDPLinear`). A subclass with its own forward
    (bitsandbytes' `Linear4bit`, a LoRA layer) is not: its weight alone does not give its output."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _is_fsdp_unit(module: nn.Module) -> bool:
    """Whether FSDP2's `fully_shard` was applied to `module` itself (its forward runs FSDP2's hooks)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(module, FSDPModule)


def _materialized(tensor: torch.Tensor | None, compute_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """The full tensor of a DTensor (FSDP2 shard; in `compute_dtype` if given and floating), else the tensor itself."""
    if tensor is None:
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return tensor
    if not isinstance(tensor, DTensor):
        return tensor
    full = tensor.full_tensor()
    if compute_dtype is not None and full.is_floating_point() and full.dtype != compute_dtype:
        full = full.to(compute_dtype)
    return full


@contextmanager
def gathered_heads(*heads: OutputHead) -> Iterator[None]:
    """Within the block, the weights of ZeRO-3 partitioned heads are gathered (a no-op otherwise).

    The fused loss reads `lm_head.weight` directly and computes its gradient in the forward, so the gather must span
    the signals pass and the loss; the caller runs inside the model's forward (`_forward_redirection`), so that
    ZeRO-3's gradient hooks are armed for the backward.
    """
    from ._compat import maybe_gather_lm_head_ctx

    params = [p for head in heads for p in head.parameters()]
    with maybe_gather_lm_head_ctx(*params):
        yield


@dataclass(frozen=True)
class SignalPlan:
    """Which per-token signals a chunked pass computes: what the selection rule declared in its `requires`.

    Attributes:
        divergence: The second axis, `"loss"` (the per-token loss itself) or one of `"reverse_kl"`, `"forward_kl"`,
            `"jsd"`.
        divergence_top_k: Teacher top-k restriction of the axis (not with `"loss"`).
        divergences: Further divergences to compute in the same pass (returned under their names; a rule reads them
            in `context.extras`), among `"jsd"`, `"reverse_kl"`, `"forward_kl"`.
        teacher: `False`: the student's side only (`entropy`, `student_log_prob`, `finite`), without running the
            teacher's head: for a rule that reads no teacher signal, before its selection.
    """

    divergence: str = "loss"
    divergence_top_k: int | None = None
    divergences: tuple[str, ...] = ()
    teacher: bool = True

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence={self.divergence!r} is unknown; allowed values: {', '.join(DIVERGENCES)}.")
        if self.divergence_top_k is not None and self.divergence == "loss":
            raise ValueError(
                "divergence_top_k does not apply to divergence='loss' (the training loss has no top-k form)."
            )
        unknown = sorted(set(self.divergences) - set(DIVERGENCES))
        if unknown:
            raise ValueError(f"divergences {unknown} are unknown; allowed values: {', '.join(DIVERGENCES)}.")

    @property
    def names(self) -> tuple[str, ...]:
        """The per-token values a pass with this plan returns (besides the boolean `finite`)."""
        if not self.teacher:
            return STUDENT_SIGNALS
        return (*SIGNAL_NAMES, *self.divergences)


def _student_logits(head, hidden: torch.Tensor) -> torch.Tensor:
    """A chunk's student logits; for a plain linear head, capped in float32 as the loss's gradient needs them."""
    if isinstance(head, OutputHead) and head.is_plain_linear:
        raw = F.linear(hidden, head.weight, head.bias)
        return head.cap(raw.float()) if head.transforms else raw
    return head(hidden)


def _drive(hidden, teacher_hidden, head, teacher_head, targets, weights, plan, beta, temperature, chunk_size, grads):
    """The chunk loop: each chunk's logits through the per-chunk function (`trl_tip.fused`); the signals written out,
    `Σ weight · loss` summed, and, with `grads` (plain linear head), the loss's gradient folded into them."""
    n, device = hidden.size(0), hidden.device
    values = {}
    if plan is not None:
        values = {name: torch.zeros(n, dtype=torch.float32, device=device) for name in plan.names}
        values["finite"] = torch.zeros(n, dtype=torch.bool, device=device)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for sl in chunk_slices(n, chunk_size):
        h = hidden[sl]
        student_logits = _student_logits(head, h)
        if plan is not None and not plan.teacher:
            values["entropy"][sl], values["student_log_prob"][sl], values["finite"][sl] = student_signals(
                student_logits, targets[sl]
            )
            continue
        teacher_logits = teacher_head(teacher_hidden[sl])
        ok = None
        # The gradient comes back already multiplied by the tokens' weights and, for a head without a logit
        # transform, in the head's dtype: the per-chunk function fuses both, so no float32 (chunk, V) gradient and
        # no further (chunk, V) copies are made here (they set the loss step's peak memory).
        fused = {}
        if grads is not None:
            fused = dict(grad_scale=weights[sl], grad_dtype=None if head.transforms else head.weight.dtype)
        if plan is None:
            per_token, grad_logits = jsd_and_grad(student_logits, teacher_logits, beta, temperature, **fused)
        else:
            *signals, ok, grad_logits, more = chunk_signals(
                student_logits,
                teacher_logits,
                targets[sl],
                beta,
                plan.divergence,
                grads is not None,
                temperature,
                plan.divergences,
                **fused,
            )
            for name, value in zip(plan.names, (*signals, *more)):
                values[name][sl] = value
            values["finite"][sl] = ok
            if plan.divergence_top_k is not None:
                top_k = divergence_from_logits(student_logits, teacher_logits, plan.divergence, plan.divergence_top_k)
                values["divergence"][sl] = torch.where(ok, top_k, torch.zeros_like(top_k))
            per_token = signals[SIGNAL_NAMES.index("loss")]
        if weights is not None:
            total += (per_token * weights[sl]).sum()
        del teacher_logits, per_token
        if grads is None:
            continue
        grad_h, grad_w, grad_b = grads
        weight = head.weight
        grad_raw = grad_logits
        if head.transforms:
            # d cap(x) / dx = scale * (1 - tanh(scale * x / c)^2) = scale * (1 - (cap(x) / c)^2)
            grad_raw = (grad_logits * head.cap_grad(student_logits)).to(weight.dtype)
        del grad_logits, student_logits
        if ok is not None:
            # Rows with non-finite logits get no gradient: 0 * NaN would otherwise poison the whole weight gradient
            # (a NaN/inf hidden row, or the soft-capping factor of a NaN logit). The per-chunk function already
            # zeroed those rows of its gradient; only the soft-capping factor, applied here, can bring a NaN back.
            skipped = ~ok.unsqueeze(-1)
            if head.transforms:
                grad_raw.masked_fill_(skipped, 0.0)
            h = h.masked_fill(skipped, 0.0)
        if grad_h is not None:
            grad_h[sl] = grad_raw @ weight
        if grad_w is not None:
            grad_w += (grad_raw.t() @ h.to(weight.dtype)).float()
        if grad_b is not None:
            grad_b += grad_raw.float().sum(0)
        del grad_raw
    return total, values


class _FusedLinearPass(torch.autograd.Function):
    """[`_drive`] for a plain linear student head: `Σ weight · loss` with its gradient computed in the forward (and
    the signals of `plan`, written into `values`)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, teacher_hidden, token_weights, head, teacher_head, targets, plan, args, values
    ):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grads = None
        if need_h or need_w or need_b:
            grads = (
                torch.zeros_like(hidden) if need_h else None,
                torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None,
                torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None,
            )
        with torch.no_grad():
            total, out = _drive(hidden, teacher_hidden, head, teacher_head, targets, token_weights, plan, *args, grads)
        values.update(out)
        ctx.grads = grads or (None, None, None)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b = ctx.grads
        del ctx.grads
        # In place: a second float32 copy of the vocabulary-sized weight gradient would raise the step's peak.
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_output.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_output).to(ctx.dtypes[0])
        if grad_b is not None:
            grad_b = grad_b.mul_(grad_output).to(ctx.dtypes[1])
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None


def chunked_pass(
    hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    head: OutputHead,
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    signals: SignalPlan | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    backend: str = "auto",
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The one chunk driver: per-token signals and/or the weighted loss of a set of positions, a chunk at a time.

    Every chunk's student and teacher logits go through one per-chunk function (`trl_tip.fused`); at most one
    chunk's `(positions × vocab)` tensors are alive, and none with grad beyond one chunk. With `signals` and
    `weights` and a plain linear student head, the signals and the loss come from the same pass (the logits and
    log-softmaxes of each chunk computed once); another head (e.g. LoRA-wrapped) takes a signals pass, then the loss.

    Args:
        hidden (`torch.Tensor`): Student final hidden states of the positions, shape `(N, d)` (with grad for a loss).
        teacher_hidden (`torch.Tensor`): Teacher final hidden states, shape `(N, d_t)`.
        head ([`OutputHead`]): The student's output head (or any callable hidden states -> logits, for signals).
        teacher_head (`Callable`): Maps teacher hidden states to logits.
        targets (`torch.Tensor`, *optional*): Next-token ids `(N,)`; needed for `signals`.
        weights (`torch.Tensor`, *optional*): Loss weight of each position `(N,)`; `None`: no loss.
        signals ([`SignalPlan`], *optional*): The signals to compute; `None`: the loss only.
        beta (`float`, *optional*, defaults to `0.5`): `beta` of the generalized JSD, as in GKD.
        temperature (`float`, *optional*, defaults to `1.0`): Temperature of the loss (signals at temperature 1).
        chunk_size (`int`, *optional*, defaults to `1024`): Positions per chunk.
        backend (`str`, *optional*, defaults to `"auto"`): Of a loss without signals, see [`kept_token_jsd`].

    Returns:
        `tuple`: The scalar float32 `Σ weights · loss` (differentiable with respect to `hidden` and the head's
        parameters; `None` without `weights`), and a dict of the signals, each `(N,)` (`SignalPlan.names` and a
        boolean `finite`; a row with a non-finite logit has `finite=False`, zero signals and no gradient).
    """
    args = (beta, float(temperature), chunk_size)
    if weights is None:
        if signals is None:
            raise ValueError("chunked_pass needs `weights` (a loss), `signals` (a SignalPlan) or both.")
        with torch.no_grad():
            return None, _drive(
                hidden.detach(), teacher_hidden, head, teacher_head, targets, None, signals, *args, None
            )[1]
    weights = weights.detach().float()
    if signals is not None and not signals.teacher:
        raise ValueError("A loss needs the teacher's logits: SignalPlan(teacher=False) is for a signals-only pass.")
    if signals is not None and isinstance(head, OutputHead) and head.is_plain_linear:
        values: dict[str, torch.Tensor] = {}
        loss = _FusedLinearPass.apply(
            hidden, head.weight, head.bias, teacher_hidden, weights, head, teacher_head, targets, signals, args, values
        )
        return loss, values
    values = (
        {}
        if signals is None
        else chunked_pass(hidden, teacher_hidden, head, teacher_head, targets, None, signals, *args)[1]
    )
    return _weighted_loss(
        hidden, teacher_hidden, head, teacher_head, weights, beta, chunk_size, temperature, backend
    ), values


def _weighted_loss(hidden, teacher_hidden, head, teacher_head, token_weights, beta, chunk_size, temperature, backend):
    """The loss without signals: TRL's kernel, the fused linear pass, or per-chunk checkpointing (see
    [`kept_token_jsd`])."""
    if backend not in LOSS_BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; allowed values: {', '.join(LOSS_BACKENDS)}.")
    linear_heads = isinstance(teacher_head, OutputHead) and is_linear_layer(head.module)
    linear_heads = linear_heads and is_linear_layer(teacher_head.module)
    if backend == "auto":
        # Measured on an H100 (benchmarks/loss_kernels.py, Qwen2.5-0.5B/1.5B heads, 819-8192 kept rows): TRL's
        # Triton kernel is as fast as the fused one (0.92-1.00x its time) and peaks lower at small kept shares (its
        # tiles scale with the rows); on the CPU (torch fallback) the fused one is faster. A ZeRO-3 partitioned head
        # needs TRL's, whose backward re-gathers it.
        # Below one of TRL's vocabulary tiles (32,768) its fixed-size tile buffers are larger than the fused kernel's
        # (chunk x vocab) ones: measured, 16 tiny-vocabulary runs sharing an H100 ran out of memory with it.
        partitioned = hasattr(getattr(head.module, "weight", None), "ds_id")
        large_vocab = head.weight is not None and head.weight.shape[0] >= TRL_VOCAB_TILE
        backend = "trl" if linear_heads and (partitioned or (hidden.is_cuda and large_vocab)) else "fused"
    if backend == "trl":
        if not linear_heads:
            raise ValueError("backend='trl' needs plain linear student and teacher heads (OutputHead of nn.Linear).")
        from ._compat import ChunkedDivergenceFunction

        divergence, _ = ChunkedDivergenceFunction.apply(
            hidden,
            head.weight,
            head.bias,
            teacher_hidden,
            teacher_head.weight,
            teacher_head.bias,
            float(beta),
            float(temperature),
            head.scale,
            head.softcap,
            teacher_head.scale,
            teacher_head.softcap,
        )
        # `+ 0 * sum`: a valid graph to the hidden states even with no kept position.
        return (divergence.float() * token_weights).sum() + hidden.sum() * 0.0
    if head.is_plain_linear:
        args = (beta, float(temperature), chunk_size)
        return _FusedLinearPass.apply(
            hidden, head.weight, head.bias, teacher_hidden, token_weights, head, teacher_head, None, None, args, {}
        )
    if torch.is_grad_enabled() and hidden.requires_grad and _is_fsdp_unit(head.module):
        raise ValueError(
            f"The student's lm_head ({type(head.module).__name__}) is sharded by FSDP2 as its own unit and is not a "
            "plain linear layer, so trl-tip's loss would call it once per chunk; accelerate groups lm_head with the "
            "final norm (and tied embeddings), and FSDP2 then frees those weights before their backward (on a GPU: an "
            "illegal memory access). Under FSDP2 keep lm_head a plain nn.Linear (no LoRA adapter, no quantization on "
            "it, e.g. leave `lm_head` out of peft's `target_modules`/`modules_to_save`), or use DeepSpeed or DDP."
        )

    def chunk_loss(h: torch.Tensor, t_hidden: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher_head(t_hidden).float() / temperature
        return (generalized_jsd(head(h).float() / temperature, teacher_logits, beta) * w).sum()

    total = hidden.new_zeros((), dtype=torch.float32)
    if hidden.size(0) == 0:
        return total + hidden.sum() * 0.0
    for sl in chunk_slices(hidden.size(0), chunk_size):
        if torch.is_grad_enabled():
            total = total + checkpoint(
                chunk_loss, hidden[sl], teacher_hidden[sl], token_weights[sl], use_reentrant=False
            )
        else:
            total = total + chunk_loss(hidden[sl], teacher_hidden[sl], token_weights[sl])
    return total


def undo_output_cast(returned: torch.Tensor, inner: torch.Tensor | None) -> torch.Tensor:
    """The loss `returned` by a wrapper's forward, holding the value of `inner`, the loss computed inside that forward,
    when the wrapper cast it to a lower precision (FSDP2's `MixedPrecisionPolicy(output_dtype=bf16)`, which accelerate
    sets for `mixed_precision: bf16`). The gradient still flows through `returned`, so the backward hooks the wrapper
    put on its outputs run; `returned` is given back as it is when nothing was cast."""
    if inner is None or returned.dtype == inner.dtype or not inner.is_floating_point():
        return returned
    returned = returned.to(inner.dtype)
    return returned + (inner.detach() - returned.detach())


def kept_token_jsd(
    hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    head: OutputHead,
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    token_weights: torch.Tensor,
    beta: float = 0.5,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Weighted sum of the per-token generalized JSD over the kept positions, with grad, in chunks.

    [`chunked_pass`] with a loss and no signals. Three implementations, all without a `(positions × vocab)` tensor
    with grad: `"fused"` (trl-tip's: chunks of positions, one log-softmax per model per chunk, the gradient computed
    in the forward), `"trl"` (TRL's `ChunkedDivergenceFunction`: vocabulary tiles, Triton on CUDA, the gradient
    recomputed in the backward, where it re-gathers ZeRO-3 partitioned heads), and a per-chunk checkpointed fallback
    for heads that are not a plain linear layer (e.g. a LoRA-wrapped `lm_head`). `"auto"` takes TRL's kernel on CUDA
    (vocabulary of 32,768 or more) and for a ZeRO-3 partitioned head, and trl-tip's otherwise.

    Args:
        hidden (`torch.Tensor`): Student final hidden states of the kept positions, shape `(K, d)`, with grad.
        teacher_hidden (`torch.Tensor`): Teacher final hidden states of the same positions, shape `(K, d_t)`.
        head ([`OutputHead`]): The student's output head.
        teacher_head (`Callable`): Maps teacher hidden states to logits (run under `no_grad`).
        token_weights (`torch.Tensor`): Weight of each position, shape `(K,)` (1 for a plain keep-mask).
        beta (`float`, *optional*, defaults to `0.5`): Generalized JSD interpolation coefficient, as in GKD.
        chunk_size (`int`, *optional*, defaults to `1024`): Positions per chunk.
        temperature (`float`, *optional*, defaults to `1.0`): Both logits are divided by it before the divergence.
        backend (`str`, *optional*, defaults to `"auto"`): `"auto"`, `"fused"` or `"trl"` (see above).

    Returns:
        `torch.Tensor`: Scalar float32 `sum_k token_weights[k] * jsd_k`, differentiable with respect to `hidden`
        and the head's parameters.
    """
    kwargs = dict(beta=beta, temperature=temperature, chunk_size=chunk_size, backend=backend)
    return chunked_pass(hidden, teacher_hidden, head, teacher_head, weights=token_weights, **kwargs)[0]


def compute_token_signals(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    targets: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    seq_idx: torch.Tensor,
    pos_idx: torch.Tensor,
    beta: float = 0.5,
    divergence: str = "loss",
    divergence_top_k: int | None = None,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> TokenSignals:
    """The per-token signals of the eligible positions from their final hidden states, chunk by chunk, without grad.

    [`chunked_pass`] with signals and no loss.

    Args:
        student_hidden (`torch.Tensor`): Student final hidden states of shape `(N, d_student)`.
        teacher_hidden (`torch.Tensor`): Teacher final hidden states of shape `(N, d_teacher)`.
        targets (`torch.Tensor`): Next-token ids of shape `(N,)`.
        student_head (`Callable`): Maps student hidden states to logits (the student's `lm_head`).
        teacher_head (`Callable`): Maps teacher hidden states to logits.
        seq_idx (`torch.Tensor`): Batch row of each position, shape `(N,)`.
        pos_idx (`torch.Tensor`): Position in the row of each position, shape `(N,)`.
        beta (`float`, *optional*, defaults to `0.5`): `beta` of the generalized JSD training loss.
        divergence (`str`, *optional*, defaults to `"loss"`): Divergence of the second axis, `"loss"` (the per-token
            loss itself, at the trainer's temperature) or one of `divergence_from_logits`'s.
        divergence_top_k (`int`, *optional*): Teacher top-k restriction of the divergence (not with `"loss"`).
        chunk_size (`int`, *optional*, defaults to `1024`): Positions per chunk.
        temperature (`float`, *optional*, defaults to `1.0`): Temperature of the per-token loss (`loss`, and the
            `"loss"` axis); the other signals are taken at temperature 1.

    Returns:
        [`TokenSignals`]: The signals of the `N` positions.
    """
    plan = SignalPlan(divergence, divergence_top_k)
    kwargs = dict(beta=beta, temperature=temperature, chunk_size=chunk_size)
    _, values = chunked_pass(
        student_hidden, teacher_hidden, student_head, teacher_head, targets, signals=plan, **kwargs
    )
    return TokenSignals.from_values(values, seq_idx, pos_idx)
