"""The loss on kept tokens, two implementations side by side: trl-tip's fused path against TRL's
`ChunkedDivergenceFunction`, on the same hidden states and heads, in one run.

Both take final hidden states of the kept positions and the two `lm_head` weights and never build full-vocabulary
logits with grad: trl-tip's `kept_token_jsd` (chunks of positions, one log-softmax per model per chunk, closed-form
gradient computed in the forward, `torch.compile` on CUDA) and TRL's `ChunkedDivergenceFunction` (tiles of positions
and vocabulary, online log-sum-exp, Triton kernels on CUDA, gradient recomputed in the backward). For each kept share
it times forward + backward (median of `--repeats` after `--warmup`), reports the peak memory above the inputs, and
checks that both give the same loss and gradients. It also times the no-grad signals pass (what selection needs
before the loss): trl-tip's `compute_token_signals` (entropy, divergence, per-token loss, log-probs, teacher entropy)
against TRL's kernel (divergence and entropy only) on all positions.

    python benchmarks/loss_kernels.py                  # Qwen2.5-0.5B/1.5B heads (V=151936), 8192 positions, bf16
    python benchmarks/loss_kernels.py --tiny           # a CPU smoke test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from trl_tip._compat import ChunkedDivergenceFunction  # noqa: E402
from trl_tip.loss import (  # noqa: E402
    OutputHead,
    compute_token_signals,  # noqa: E402
    kept_token_jsd,
)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, warmup: int, repeats: int) -> tuple[float, float]:
    """Median seconds of `fn()` and the peak memory (GiB) it allocated above what was allocated before."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    peak = 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2**30)
    return statistics.median(times), peak


def table(rows: list[dict]) -> str:
    """The markdown table of `main`'s rows."""
    lines = [
        "| pass | kept | rows | trl-tip s | TRL kernel s | trl-tip / TRL | trl-tip GiB | TRL GiB | loss rel diff | "
        "grad rel diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['kind']} | {r['kept']:.2f} | {r['rows']} | {r['ours_s']:.4f} | {r['trl_s']:.4f} | "
        f"{r['ours_s'] / r['trl_s']:.2f} | {r['ours_gib']:.2f} | {r['trl_gib']:.2f} | {r['loss_rel_diff']:.1e} | "
        f"{r['grad_rel_diff']:.1e} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    """Runs the comparison (see the module docstring); returns one dict per pass and kept share: `kind`, `kept`,
    `rows`, seconds (`ours_s`, `trl_s`), peak GiB (`ours_gib`, `trl_gib`), `loss_rel_diff` and `grad_rel_diff`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=8192, help="eligible positions (e.g. 4 x 2048)")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--student-dim", type=int, default=896)
    parser.add_argument("--teacher-dim", type=int, default=1536)
    parser.add_argument("--kept", default="1.0,0.5,0.2,0.1", help="kept shares, comma-separated")
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="small sizes on the CPU (smoke test)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.positions, args.vocab, args.student_dim, args.teacher_dim = 64, 97, 16, 24
        args.dtype, args.warmup, args.repeats = "float32", 0, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    student_head = nn.Linear(args.student_dim, args.vocab, bias=False, device=device, dtype=dtype)
    teacher_head = nn.Linear(args.teacher_dim, args.vocab, bias=False, device=device, dtype=dtype)
    for head in (student_head, teacher_head):
        nn.init.normal_(head.weight, std=0.02)
    teacher_head.requires_grad_(False)
    hidden = torch.randn(args.positions, args.student_dim, device=device, dtype=dtype)
    teacher_hidden = torch.randn(args.positions, args.teacher_dim, device=device, dtype=dtype)
    s_out, t_out = OutputHead(student_head), OutputHead(teacher_head)
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) dtype={dtype} "
          f"positions={args.positions} vocab={args.vocab} beta={args.beta}", flush=True)  # fmt: skip

    rows = []
    for share in [float(x) for x in args.kept.split(",")]:
        k = max(1, int(round(share * args.positions)))
        h = hidden[:k].detach().requires_grad_(True)
        th = teacher_hidden[:k]
        ones = torch.ones(k, device=device)

        def ours(h=h, th=th, ones=ones, k=k):
            student_head.weight.grad = None
            h.grad = None
            loss = kept_token_jsd(h, th, s_out, t_out, ones, beta=args.beta, chunk_size=1024) / k
            loss.backward()
            return loss

        def trl(h=h, th=th, k=k):
            student_head.weight.grad = None
            h.grad = None
            div, _ = ChunkedDivergenceFunction.apply(
                h, student_head.weight, None, th, teacher_head.weight, None, args.beta, 1.0, 1.0, None, 1.0, None
            )
            loss = div.sum() / k
            loss.backward()
            return loss

        loss_ours = ours().detach().float()
        grads_ours = (h.grad.float().clone(), student_head.weight.grad.float().clone())
        loss_trl = trl().detach().float()
        grads_trl = (h.grad.float().clone(), student_head.weight.grad.float().clone())
        rel = max(
            float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(grads_ours, grads_trl, strict=True)
        )
        loss_rel = float((loss_ours - loss_trl).abs() / loss_trl.abs().clamp_min(1e-30))
        t_ours, m_ours = _time(ours, device, args.warmup, args.repeats)
        t_trl, m_trl = _time(trl, device, args.warmup, args.repeats)
        rows.append(
            dict(kind="loss fwd+bwd", kept=share, rows=k, ours_s=t_ours, trl_s=t_trl, ours_gib=m_ours, trl_gib=m_trl,
                 loss_rel_diff=loss_rel, grad_rel_diff=rel)
        )  # fmt: skip
        print(rows[-1], flush=True)

    targets = torch.randint(0, args.vocab, (args.positions,), device=device)
    idx = torch.arange(args.positions, device=device)

    def ours_signals():
        with torch.no_grad():
            return compute_token_signals(
                hidden, teacher_hidden, targets, s_out, t_out, idx, idx, beta=args.beta, divergence="loss"
            )

    def trl_signals():
        with torch.no_grad():
            return ChunkedDivergenceFunction.apply(
                hidden, student_head.weight, None, teacher_hidden, teacher_head.weight, None,
                args.beta, 1.0, 1.0, None, 1.0, None,
            )  # fmt: skip

    t_ours, m_ours = _time(ours_signals, device, args.warmup, args.repeats)
    t_trl, m_trl = _time(trl_signals, device, args.warmup, args.repeats)
    rows.append(
        dict(kind="signals (no grad)", kept=1.0, rows=args.positions, ours_s=t_ours, trl_s=t_trl, ours_gib=m_ours,
             trl_gib=m_trl, loss_rel_diff=float("nan"), grad_rel_diff=float("nan"))
    )  # fmt: skip
    print(rows[-1], flush=True)

    print("\n" + table(rows))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
