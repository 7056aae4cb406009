"""Per-chunk math shared by the signals and the loss: one log-softmax per model, everything else derived from it.

The full-vocabulary work of a step is memory-bound: each pass over a `(chunk, V)` float32 tensor costs about as
much as the chunk's `lm_head` matmul. The reference functions of `signals.py` (`normalized_entropy`,
`generalized_jsd`, `divergence_from_logits`, `token_log_probs`) each take their own log-softmaxes; here the student
and teacher log-probabilities are computed once per chunk and every signal, the generalized JSD and its gradient
with respect to the student logits are read off them. The gradient is closed-form, so the loss needs no autograd
graph over `(chunk, V)` tensors:

    M = (1 - b) S + b T,  JSD_b = b KL(T || M) + (1 - b) KL(S || M)
    d JSD_b / d s = (1 - b) S * (log S - log M - KL(S || M))          (0 < b < 1)
    d KL(T || S) / d s = S - T                                         (b = 0)
    d KL(S || T) / d s = S * (log S - log T - KL(S || T))              (b = 1)

One per-chunk function, `_chunk`, does it all; its three modes are the public wrappers: [`chunk_signals`] (every
signal, and the gradient when the loss is taken in the same pass), [`student_signals`] (the student's side only, for
a rule that reads no teacher signal) and [`jsd_and_grad`] (the loss and its gradient, for the kept tokens). The
chunk driver that feeds it logits is `trl_tip.loss.chunked_pass`. On CUDA each mode is compiled with
`torch.compile` (fusing the passes into a few kernels) unless the environment variable `TRL_TIP_COMPILE=0` is set
or compilation fails, in which case it runs eagerly.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F


__all__ = ["chunk_signals", "jsd_and_grad", "student_signals"]


def _jsd_parts(ls: torch.Tensor, lt: torch.Tensor, beta: float):
    """Per-token generalized JSD, the student probabilities, and the gradient factor, from log-probabilities."""
    ps = ls.exp()
    if beta == 0.0:
        pt = lt.exp()
        jsd = (pt * (lt - ls)).sum(-1)
        return jsd, ps, pt, None
    if beta == 1.0:
        jsd = (ps * (ls - lt)).sum(-1)
        return jsd, ps, None, None
    pt = lt.exp()
    lm = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
    kl_s = (ps * (ls - lm)).sum(-1)
    kl_t = (pt * (lt - lm)).sum(-1)
    return beta * kl_t + (1.0 - beta) * kl_s, ps, pt, (lm, kl_s)


def _jsd_grad(ls, lt, ps, pt, extra, jsd, beta: float) -> torch.Tensor:
    if beta == 0.0:
        return ps - pt
    if beta == 1.0:
        return ps * (ls - lt - jsd.unsqueeze(-1))
    lm, kl_s = extra
    return (1.0 - beta) * ps * (ls - lm - kl_s.unsqueeze(-1))


def _finish_grad(grad: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor:
    if scale is not None:
        grad = grad * scale.unsqueeze(-1)
    return grad if dtype is None else grad.to(dtype)


def _symmetric_jsd(ls: torch.Tensor, lt: torch.Tensor, ps: torch.Tensor, pt: torch.Tensor) -> torch.Tensor:
    lm = torch.logaddexp(ls + math.log(0.5), lt + math.log(0.5))
    return (0.5 * (pt * (lt - lm)).sum(-1) + 0.5 * (ps * (ls - lm)).sum(-1)) / math.log(2)


def _chunk(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor | None,
    beta: float,
    divergence: str,
    with_grad: bool,
    temperature: float,
    divergences: tuple[str, ...],
    signals: bool,
    grad_scale: torch.Tensor | None = None,
    grad_dtype: torch.dtype | None = None,
):
    """The one per-chunk function: logits of a chunk of positions -> its signals, loss and gradient (see the
    wrappers [`chunk_signals`], [`student_signals`] and [`jsd_and_grad`] for what each mode returns). The gradient
    is multiplied row by row by `grad_scale` and cast to `grad_dtype` inside the (compiled) function, so no float32
    `(n, V)` gradient is materialised when the caller wants it scaled and in the head's dtype."""
    s = student_logits.float()
    if not signals:
        # The loss and its gradient only (the kept tokens' loss after a selection).
        t = teacher_logits.float()
        if temperature != 1.0:
            s, t = s / temperature, t / temperature
        ls, lt = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
        loss, ps, pt, jsd_extra = _jsd_parts(ls, lt, beta)
        grad = _jsd_grad(ls, lt, ps, pt, jsd_extra, loss, beta)
        return loss, _finish_grad(grad / temperature if temperature != 1.0 else grad, grad_scale, grad_dtype)
    ls = F.log_softmax(s, dim=-1)
    log_v = math.log(s.size(-1)) if s.size(-1) > 1 else 1.0
    if teacher_logits is None:
        # The student's side only (a rule that reads no teacher signal, before its selection).
        entropy = -(ls.exp() * ls).sum(-1) / log_v
        slp = ls.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ok = torch.isfinite(entropy)
        return torch.where(ok, entropy, torch.zeros_like(entropy)), torch.where(ok, slp, torch.zeros_like(slp)), ok
    t = teacher_logits.float()
    lt = F.log_softmax(t, dim=-1)
    if temperature == 1.0:
        lsl, ltl = ls, lt
    else:
        # The loss (and its gradient) at the trainer's temperature; every other signal at temperature 1.
        lsl, ltl = F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)
    loss, psl, ptl, jsd_extra = _jsd_parts(lsl, ltl, beta)
    ps = psl if temperature == 1.0 else ls.exp()
    pt = lt.exp() if (ptl is None or temperature != 1.0) else ptl
    entropy = -(ps * ls).sum(-1) / log_v
    teacher_entropy = -(pt * lt).sum(-1) / log_v
    named = {}
    for name in {divergence, *divergences}:
        if name == "loss":
            named[name] = loss
        elif name == "jsd":
            named[name] = (
                loss / math.log(2) if (beta == 0.5 and temperature == 1.0) else _symmetric_jsd(ls, lt, ps, pt)
            )
        elif name == "reverse_kl":
            named[name] = loss if (beta == 1.0 and temperature == 1.0) else (ps * (ls - lt)).sum(-1)
        else:  # forward_kl
            named[name] = loss if (beta == 0.0 and temperature == 1.0) else (pt * (lt - ls)).sum(-1)
    idx = targets.unsqueeze(-1)
    slp = ls.gather(-1, idx).squeeze(-1)
    tlp = lt.gather(-1, idx).squeeze(-1)
    # Any inf or NaN logit makes that row's entropy NaN (inf - inf, 0 * -inf, or NaN propagating), so the finiteness
    # of both entropies tells exactly the rows whose logits are all finite, without another pass over the logits.
    ok = torch.isfinite(entropy) & torch.isfinite(teacher_entropy)

    def clean(v):
        return torch.where(ok, v, torch.zeros_like(v))

    values = tuple(clean(v) for v in (entropy, teacher_entropy, named[divergence], loss, slp, tlp))
    grad = None
    if with_grad:
        grad = _jsd_grad(lsl, ltl, psl, ptl, jsd_extra, loss, beta)
        if temperature != 1.0:
            grad = grad / temperature
        grad = _finish_grad(torch.where(ok.unsqueeze(-1), grad, torch.zeros_like(grad)), grad_scale, grad_dtype)
    return (*values, ok, grad, tuple(clean(named[name]) for name in divergences))


_COMPILED: dict[str, object] = {}
_FAILED: set[str] = set()


def _compile_enabled(t: torch.Tensor) -> bool:
    return t.is_cuda and os.environ.get("TRL_TIP_COMPILE", "1") != "0"


def _run(name: str, fn, *args):
    """Runs `fn` compiled (CUDA, once per function, dynamic in the number of positions) or eagerly."""
    if not _compile_enabled(args[0]) or name in _FAILED:
        return fn(*args)
    compiled = _COMPILED.get(name)
    if compiled is None:
        compiled = _COMPILED[name] = torch.compile(fn, dynamic=True)
    try:
        return compiled(*args)
    except Exception as exc:  # pragma: no cover - depends on the GPU toolchain
        _FAILED.add(name)
        warnings.warn(f"trl_tip: torch.compile of {name} failed ({exc!r}); running it eagerly.", stacklevel=2)
        return fn(*args)


def jsd_and_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
    grad_scale: torch.Tensor | None = None,
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token generalized JSD (as GKD computes it) and its gradient with respect to the student logits.

    Args:
        student_logits (`torch.Tensor`): Student logits of shape `(n, V)`.
        teacher_logits (`torch.Tensor`): Teacher logits of shape `(n, V)`.
        beta (`float`): Interpolation coefficient in `[0, 1]`.
        temperature (`float`, *optional*, defaults to `1.0`): Both logits are divided by it first.
        grad_scale (`torch.Tensor`, *optional*): Shape `(n,)`; row `i` of the gradient is multiplied by it.
        grad_dtype (`torch.dtype`, *optional*): The gradient's dtype (float32 by default).

    Returns:
        `tuple`: The divergences, shape `(n,)`, and `d jsd_i / d student_logits[i]`, shape `(n, V)` (times
        `grad_scale`, in `grad_dtype`).
    """
    args = (student_logits, teacher_logits, None, float(beta), "loss", True, float(temperature), (), False)
    args += (grad_scale, grad_dtype)
    return _run("jsd_and_grad", _chunk, *args)


def student_signals(
    student_logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's side of the signals of a chunk of positions, without the teacher's logits.

    Returns:
        `tuple`: `(entropy, student_log_prob, finite)`, each `(n,)`: the entropy divided by `ln V` and the
        log-probability of `targets` (float32, 0 on a row with a non-finite logit), and whether the row is finite.
    """
    return _run("student_signals", _chunk, student_logits, None, targets, 0.5, "loss", False, 1.0, (), True)


def chunk_signals(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    beta: float = 0.5,
    divergence: str = "loss",
    with_grad: bool = False,
    temperature: float = 1.0,
    divergences: tuple[str, ...] = (),
    grad_scale: torch.Tensor | None = None,
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, ...]:
    """Every per-token signal of a chunk of positions from one log-softmax per model.

    A row whose student or teacher logits hold an inf or a NaN gets `finite = False`, zero signals and a zero
    gradient.

    Args:
        student_logits (`torch.Tensor`): Student logits of shape `(n, V)`.
        teacher_logits (`torch.Tensor`): Teacher logits of shape `(n, V)`.
        targets (`torch.Tensor`): Next-token ids of shape `(n,)`.
        beta (`float`): `beta` of the generalized JSD training loss.
        divergence (`str`): The second axis: `"loss"` (the per-token loss itself), `"jsd"`, `"reverse_kl"` or
            `"forward_kl"` (no top-k restriction).
        with_grad (`bool`): Also return the gradient of the loss with respect to the student logits.
        temperature (`float`, *optional*, defaults to `1.0`): Temperature of the loss and its gradient (both logits
            divided by it); the other signals are taken at temperature 1.
        divergences (`tuple[str, ...]`, *optional*): Further divergences to return (a rule's `requires`), among
            `"jsd"`, `"reverse_kl"`, `"forward_kl"` and `"loss"` (temperature 1).
        grad_scale (`torch.Tensor`, *optional*): Shape `(n,)`; row `i` of the gradient is multiplied by it.
        grad_dtype (`torch.dtype`, *optional*): The gradient's dtype (float32 by default).

    Returns:
        `tuple`: `(entropy, teacher_entropy, divergence, loss, student_log_prob, teacher_log_prob, finite, grad,
        extras)`, the first seven of shape `(n,)` (float32, entropies divided by `ln V`; `finite` boolean), `grad` of
        shape `(n, V)` (times `grad_scale`, in `grad_dtype`) or `None`, `extras` a tuple with one `(n,)` tensor per
        name in `divergences`.
    """
    args = (float(beta), divergence, bool(with_grad), float(temperature), tuple(divergences), True)
    args += (grad_scale, grad_dtype)
    return _run(f"chunk_signals_{bool(with_grad)}", _chunk, student_logits, teacher_logits, targets, *args)
