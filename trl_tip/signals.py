"""Per-token signals of on-policy distillation: entropy, divergence, per-token loss, sampled-token log-probs.

Everything here runs without grad. The functions on logits are pure reference implementations (the fused per-chunk
function of `trl_tip.fused` is tested against them); the chunk driver that computes the signals of a micro-batch is
`trl_tip.loss.chunked_pass` (and its signals-only form `compute_token_signals`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


# The second axis: the per-token training loss (default; the TIP paper's KL(student || teacher) with beta = 1) or one of
# the divergences computed from the logits.
DIVERGENCES = ("loss", "reverse_kl", "forward_kl", "jsd")
# The per-token values of `TokenSignals` (besides `finite` and the indices), and those read off the student's logits
# alone. A rule names what it reads among these (and further divergences of `DIVERGENCES`) in its `requires`.
SIGNAL_NAMES = ("entropy", "teacher_entropy", "divergence", "loss", "student_log_prob", "teacher_log_prob")
STUDENT_SIGNALS = ("entropy", "student_log_prob")

__all__ = [
    "DIVERGENCES",
    "SIGNAL_NAMES",
    "STUDENT_SIGNALS",
    "TokenSignals",
    "chunk_slices",
    "divergence_from_logits",
    "generalized_jsd",
    "history_token_losses",
    "normalized_entropy",
    "token_log_probs",
]


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of `softmax(logits)` over the last dimension, divided by `ln V` so that it lies in `[0, 1]`.

    Args:
        logits (`torch.Tensor`): Logits of shape `(..., V)`.

    Returns:
        `torch.Tensor`: Normalised entropy of shape `(...)`, in float32.
    """
    logits = logits.float()
    log_p = F.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    vocab = logits.size(-1)
    return entropy / math.log(vocab) if vocab > 1 else torch.zeros_like(entropy)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Per-token generalized Jensen-Shannon divergence, exactly as `GKDTrainer.generalized_jsd_loss` computes it.

    With the mixture `M = (1 - beta) * S + beta * T`, the value is `beta * KL(T || M) + (1 - beta) * KL(S || M)`;
    `beta = 0` gives `KL(T || S)` (forward KL) and `beta = 1` gives `KL(S || T)` (reverse KL).

    Args:
        student_logits (`torch.Tensor`): Student logits of shape `(..., V)`.
        teacher_logits (`torch.Tensor`): Teacher logits of shape `(..., V)`.
        beta (`float`, *optional*, defaults to `0.5`): Interpolation coefficient in `[0, 1]`.

    Returns:
        `torch.Tensor`: Per-token divergence of shape `(...)`, in the dtype of the inputs.
    """
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-beta_t), teacher_log_probs + torch.log(beta_t)]), dim=0
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    return jsd.sum(-1)


def divergence_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "jsd",
    top_k: int | None = None,
) -> torch.Tensor:
    """Teacher–student divergence per token, the second TIP axis.

    Args:
        student_logits (`torch.Tensor`): Student logits of shape `(..., V)`.
        teacher_logits (`torch.Tensor`): Teacher logits of shape `(..., V)`.
        kind (`str`, *optional*, defaults to `"jsd"`):
            `"jsd"`: symmetric Jensen-Shannon divergence divided by `ln 2`, in `[0, 1]`;
            `"reverse_kl"`: `KL(student || teacher)`; `"forward_kl"`: `KL(teacher || student)`.
        top_k (`int`, *optional*):
            If set, both distributions are restricted to the teacher's `top_k` most likely tokens and renormalised
            there before the divergence is taken (cuts the long-tail noise of the vocabulary).

    Returns:
        `torch.Tensor`: Divergence of shape `(...)`, in float32.
    """
    kinds = ("jsd", "reverse_kl", "forward_kl")
    if kind not in kinds:
        raise ValueError(f"Unknown divergence {kind!r}; allowed values: {', '.join(kinds)}.")
    student_logits = student_logits.float()
    teacher_logits = teacher_logits.float()
    if top_k is not None and top_k < teacher_logits.size(-1):
        top_idx = teacher_logits.topk(top_k, dim=-1).indices
        teacher_logits = teacher_logits.gather(-1, top_idx)
        student_logits = student_logits.gather(-1, top_idx)
    if kind == "jsd":
        return generalized_jsd(student_logits, teacher_logits, beta=0.5) / math.log(2)
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if kind == "reverse_kl":
        return (student_log_probs.exp() * (student_log_probs - teacher_log_probs)).sum(-1)
    return (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)


def token_log_probs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of `token_ids` under `softmax(logits)`.

    Args:
        logits (`torch.Tensor`): Logits of shape `(..., V)`.
        token_ids (`torch.Tensor`): Token ids of shape `(...)`.

    Returns:
        `torch.Tensor`: Log-probabilities of shape `(...)`, in float32.
    """
    logits = logits.float()
    return logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@dataclass
class TokenSignals:
    """Per-token signals of the eligible completion positions of one micro-batch, flattened to 1-D.

    Every field has shape `(N,)`, `N` being the number of eligible positions (labels `!= -100` after the causal
    shift). Positions whose student or teacher logits are not finite have `finite = False`; their other values are
    set to zero and they are never selected.

    Attributes:
        entropy: Student entropy divided by `ln V`, in `[0, 1]`.
        divergence: Teacher–student divergence (`TIPConfig.divergence`; by default the per-token loss).
        loss: Per-token training loss before selection (generalized JSD with `beta`, as in GKD).
        student_log_prob: Student log-probability of the token that follows (the sampled token on-policy).
        teacher_log_prob: Teacher log-probability of the same token.
        teacher_entropy: Teacher entropy divided by `ln V`.
        finite: Whether both logit rows were finite.
        seq_idx: Row of the batch each position belongs to.
        pos_idx: Position in the row (index into the shifted sequence, i.e. the position whose logits predict it).
    """

    entropy: torch.Tensor
    divergence: torch.Tensor
    loss: torch.Tensor
    student_log_prob: torch.Tensor
    teacher_log_prob: torch.Tensor
    teacher_entropy: torch.Tensor
    finite: torch.Tensor
    seq_idx: torch.Tensor
    pos_idx: torch.Tensor

    def __len__(self) -> int:
        return self.entropy.numel()

    @classmethod
    def from_values(
        cls, values: dict[str, torch.Tensor], seq_idx: torch.Tensor, pos_idx: torch.Tensor
    ) -> TokenSignals:
        """The signals from the dict of a chunked pass (`trl_tip.loss.chunked_pass`); a signal it did not compute
        (the teacher's side of a student-only pass) is NaN."""
        missing = torch.full_like(values["entropy"], float("nan"))
        return cls(
            **{name: values.get(name, missing) for name in SIGNAL_NAMES},
            finite=values["finite"],
            seq_idx=seq_idx,
            pos_idx=pos_idx,
        )

    def subset(self, index: torch.Tensor) -> TokenSignals:
        """Returns the signals of the positions selected by `index` (a boolean mask or integer indices)."""
        return TokenSignals(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def chunk_slices(n: int, chunk_size: int) -> Iterator[slice]:
    """The slices `[0, c), [c, 2c), ...` covering `range(n)` in chunks of `chunk_size` (the last one shorter)."""
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


HISTORY_LOSSES = ("nll", "divergence")


@torch.no_grad()
def history_token_losses(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    kinds: tuple[str, ...],
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    beta: float = 0.5,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Per-token losses of a model (ssToken's history model) from its final hidden states, chunk by chunk.

    Args:
        hidden (`torch.Tensor`): Final hidden states of the eligible positions, shape `(N, d)`.
        targets (`torch.Tensor`): Next-token ids, shape `(N,)`.
        head (`Callable`): Maps the hidden states to logits.
        kinds (`tuple[str, ...]`): Losses to compute among `"nll"` (negative log-likelihood of the target) and
            `"divergence"` (generalized JSD with `beta` to the teacher, GKD's per-token loss).
        teacher_hidden (`torch.Tensor`, *optional*): Teacher final hidden states `(N, d_t)`; needed for `divergence`.
        teacher_head (`Callable`, *optional*): The teacher's head; needed for `divergence`.
        beta (`float`, *optional*, defaults to `0.5`): `beta` of the generalized JSD.
        chunk_size (`int`, *optional*, defaults to `1024`): Positions per chunk.
        temperature (`float`, *optional*, defaults to `1.0`): Temperature of the `divergence` (both logits divided by
            it), the engine's loss temperature, so that it compares with the current model's per-token loss
            (`TokenSignals.loss`); `nll` is taken at temperature 1, as `TokenSignals.student_log_prob`.

    Returns:
        `dict[str, torch.Tensor]`: For each kind, float32 `(N,)`; NaN where the logits are not finite.
    """
    for kind in kinds:
        if kind not in HISTORY_LOSSES:
            raise ValueError(f"Unknown per-token loss {kind!r}; allowed values: {', '.join(HISTORY_LOSSES)}.")
    if "divergence" in kinds and (teacher_hidden is None or teacher_head is None):
        raise ValueError("The `divergence` per-token loss needs teacher_hidden and teacher_head.")
    n = targets.numel()
    out = {kind: torch.full((n,), float("nan"), device=targets.device) for kind in kinds}
    for sl in chunk_slices(n, chunk_size):
        logits = head(hidden[sl]).float()
        ok = torch.isfinite(logits).all(-1)
        if "nll" in kinds:
            out["nll"][sl] = torch.where(ok, -token_log_probs(logits, targets[sl]), float("nan"))
        if "divergence" in kinds:
            t_logits = teacher_head(teacher_hidden[sl]).float()
            ok = ok & torch.isfinite(t_logits).all(-1)
            if temperature != 1.0:
                value = generalized_jsd(logits / temperature, t_logits / temperature, beta)
            else:
                value = generalized_jsd(logits, t_logits, beta)
            out["divergence"][sl] = torch.where(ok, value, float("nan"))
            del t_logits
        del logits
    return out
