"""Multi-process check of TIPTrainer: thresholds, statistics and loss normalisation agree with one process.

Run it once with one process (`--reference`), which computes loss, gradients, thresholds and statistics on a fixed
batch of 8 conversations, then with several processes, each taking its share of the same rows (shares of unequal
token counts). Each rank prints its thresholds and its `tip/...` statistics; rank 0 prints the check that

* the thresholds of every rank are equal, and equal to the one-process thresholds (quantiles over all ranks' tokens),
* the statistics logged by every rank are equal, and equal to the one-process statistics,
* the mean over ranks of the per-rank losses, and the ranks' gradients averaged as DDP averages them, equal the
  one-process loss and gradients: the loss is normalised over all ranks' kept tokens,

for rule `all`, for the deterministic rules `quadrants` (Q3, quantile thresholds), `tip` (Soft-OR, normalised over all
ranks) and `q3_score` (forward KL from the same pass), and, with two processes, for a
selector that keeps nothing on rank 0 and everything on rank 1 (one process: the rows rank 1 takes), so one rank has
zero kept tokens while the other has some. Then short `trainer.train()` runs with on-policy generation under DDP
(`quadrants` Q3, and the zero-on-rank-0 selector, which must not hang) and the logged `tip/...` metrics of every
rank are compared.

CPU (gloo):
    python benchmarks/ddp_check.py --reference --out /tmp/ddp
    python -m torch.distributed.run --nproc_per_node 2 benchmarks/ddp_check.py --out /tmp/ddp
GPU (NCCL), e.g. 2 GPUs (the reference run pins itself to the first visible GPU):
    python benchmarks/ddp_check.py --reference --out /tmp/ddp --device cuda
    torchrun --nproc_per_node 2 benchmarks/ddp_check.py --out /tmp/ddp --device cuda
`--json FILE` writes the report (`check`'s return value) for tests and tools. Exits with status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


RULES = {
    "all": {"token_selection": "all"},
    "quadrants_q3": {"token_selection": "quadrants", "quadrants": ["Q3"]},
    # The paper's score rules: per-rollout budgets on min-max axes normalised over every rank's tokens, so the
    # selection (and loss, gradients, statistics) of a multi-process run is the one-process selection.
    "tip": {"token_selection": "tip"},
    "q3_score": {"token_selection": "q3_score", "keep_ratio": 0.5},
    "rank0_keeps_nothing": {"token_selection": "all"},
}
NUM_ROWS = 8


class KeepNothingOnRankZero:
    """Keeps nothing on rank 0 and every token on the other ranks; on one process, every token of the rows that rank 1
    takes in a two-process run (so the one-process reference is the same selection)."""

    def __call__(self, signals, context):
        if context.num_processes > 1:
            keep = context.process_index != 0
            return torch.full((len(signals),), keep, dtype=torch.bool, device=signals.entropy.device)
        return signals.seq_idx >= len(_shares(2)[0])

    def __repr__(self) -> str:
        return "KeepNothingOnRankZero()"


def _trainer(rule: str, output_dir: str, device: str, train_steps: int = 0):
    from trl_tip import TIPConfig, TIPTrainer
    from trl_tip.toy import arithmetic_dataset, make_model, make_tokenizer

    tokenizer = make_tokenizer()
    teacher = make_model(tokenizer, 48, 1, seed=1)
    student = make_model(tokenizer, 32, 1, seed=2)
    args = TIPConfig(
        output_dir=output_dir,
        use_cpu=device == "cpu",
        bf16=False,
        seed=0,
        max_steps=max(train_steps, 1),
        per_device_train_batch_size=NUM_ROWS // 2,
        learning_rate=1e-3,
        lmbda=1.0,
        beta=0.5,
        max_new_tokens=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=False,
        tip_chunk_size=5,
        **RULES[rule],
    )
    dataset = arithmetic_dataset(64 if train_steps else NUM_ROWS, seed=7, max_operand=999)
    trainer = TIPTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        selector=KeepNothingOnRankZero() if rule == "rank0_keeps_nothing" else None,
    )
    return trainer, dataset


def _shares(num_processes: int) -> list[range]:
    """Unequal row shares: rank 0 takes fewer rows than the others."""
    if num_processes == 1:
        return [range(NUM_ROWS)]
    bounds = [0] + [NUM_ROWS * (r + 1) // num_processes - (1 if r == 0 else 0) for r in range(num_processes)]
    bounds[-1] = NUM_ROWS
    return [range(bounds[r], bounds[r + 1]) for r in range(num_processes)]


def _step(trainer, dataset) -> dict:
    """One micro-batch on this rank's rows: loss, gradients (DDP-averaged), thresholds, reduced statistics."""
    acc = trainer.accelerator
    rows = _shares(acc.num_processes)[acc.process_index]
    batch = trainer.data_collator([dataset[i] for i in rows])
    inputs = trainer._prepare_inputs(batch)
    eligible = (inputs["labels"][:, 1:] != -100).sum()
    step_tokens = acc.reduce(eligible.clone(), reduction="sum") if acc.num_processes > 1 else eligible

    thresholds, kept_here = [], []

    class Recorder:
        def on_selection(self, record, engine):
            thresholds.append((record.entropy_threshold, record.divergence_threshold))
            kept_here.append(int(record.kept.sum()))

    trainer.tip_engine.add_observer(Recorder())
    model = trainer.model
    model.train()
    for p in model.parameters():
        p.grad = None
    loss = trainer.compute_loss(model, inputs, num_items_in_batch=step_tokens)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()
    loss_value = loss.detach().double().reshape(1)
    if acc.num_processes > 1:  # as DDP does: gradients averaged; the logged loss is the mean over ranks
        dist.all_reduce(grads)
        dist.all_reduce(loss_value)
        grads /= acc.num_processes
        loss_value /= acc.num_processes

    def reduce_sum(t):
        return acc.reduce(t, reduction="sum") if acc.num_processes > 1 else t

    stats = trainer.tip_statistics.compute(reduce_sum, num_steps=1)
    return {
        "rows": list(rows),
        "eligible": int(eligible),
        "loss": float(loss_value),
        "grads": grads.cpu(),
        "thresholds": [float(thresholds[0][0]), float(thresholds[0][1])],
        "kept_here": kept_here[0],
        "stats": stats,
    }


def _gather(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _train_logs(output_dir: str, device: str, steps: int = 2, rule: str = "quadrants_q3") -> list[dict]:
    trainer, _ = _trainer(rule, output_dir, device, train_steps=steps)
    trainer.train()
    return [{k: v for k, v in log.items() if k.startswith("tip/") or k == "loss"} for log in trainer.state.log_history]


def check(out: str, reference: bool = False, device: str = "cpu", train_steps: int = 2) -> dict:
    """Runs the check on this process (one of `WORLD_SIZE`); returns the report, the same on every rank.

    With `reference`, computes the one-process reference, saves it to `out/reference.pt` and returns
    `{"reference": path}`. Otherwise returns `{"passed", "world_size", "rules", "train"}`: per rule, each rank's rows,
    thresholds and kept-token counts (`per_rank`), whether thresholds and statistics are equal on all ranks and to the
    one-process run, the loss and gradient differences and `passed`; per `train()` rule, whether the loss was finite,
    the `tip/*` logs identical on all ranks, the logged kept shares and `passed`.
    """
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    results = {}
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rules = [rule for rule in RULES if rule != "rank0_keeps_nothing" or world_size <= 2]
    with tempfile.TemporaryDirectory() as tmp:
        for rule in rules:
            trainer, dataset = _trainer(rule, tmp, device)
            results[rule] = _step(trainer, dataset)
            rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
            r = results[rule]
            print(
                f"[rank {rank}/{world}] rule={rule} rows={r['rows'][0]}..{r['rows'][-1]} eligible={r['eligible']} "
                f"thresholds H>={r['thresholds'][0]:.6f} D>={r['thresholds'][1]:.6f} "
                f"kept here={r['kept_here']} all ranks={r['stats']['tip/tokens_kept']:.0f}/{r['stats']['tip/tokens_eligible']:.0f} "
                f"q3_frac={r['stats']['tip/q3/frac']:.4f} loss(mean over ranks)={r['loss']:.8f}",
                flush=True,
            )
        if reference:
            path = os.path.join(out, "reference.pt")
            torch.save(results, path)
            print(f"reference written to {path}")
            return {"reference": path}
        ref_results = torch.load(os.path.join(out, "reference.pt"), weights_only=False)
        everyone = _gather({rule: {k: v for k, v in r.items() if k != "grads"} for rule, r in results.items()})
        report = {"passed": True, "world_size": world_size, "rules": [], "train": []}
        for rule, r in results.items():
            ref = ref_results[rule]
            row = {
                "rule": rule,
                "per_rank": [
                    {
                        "rank": rank,
                        "rows": [e[rule]["rows"][0], e[rule]["rows"][-1]],
                        "eligible": e[rule]["eligible"],
                        "kept_here": e[rule]["kept_here"],
                        "thresholds": e[rule]["thresholds"],
                    }
                    for rank, e in enumerate(everyone)
                ],
                "thresholds": r["thresholds"],
                "reference_thresholds": ref["thresholds"],
                "same_thresholds": all(e[rule]["thresholds"] == r["thresholds"] for e in everyone),
                "close_thresholds": torch.allclose(
                    torch.tensor(r["thresholds"]), torch.tensor(ref["thresholds"]), 1e-5, 1e-7
                ),
                "same_stats": all(e[rule]["stats"] == r["stats"] for e in everyone),
                "stat_diff": max(
                    abs(r["stats"][k] - ref["stats"][k]) / max(1.0, abs(ref["stats"][k])) for k in ref["stats"]
                ),
                "loss": r["loss"],
                "reference_loss": ref["loss"],
                "loss_diff": abs(r["loss"] - ref["loss"]),
                "grad_diff": float((r["grads"] - ref["grads"]).abs().max() / ref["grads"].abs().max()),
            }
            row["passed"] = bool(
                row["same_thresholds"]
                and row["same_stats"]
                and row["close_thresholds"]
                and row["stat_diff"] < 1e-5
                and row["loss_diff"] < 1e-6 * max(1.0, abs(ref["loss"]))
                and row["grad_diff"] < 1e-4
            )
            report["passed"] &= row["passed"]
            report["rules"].append(row)
        for rule in ("quadrants_q3", "rank0_keeps_nothing") if train_steps else ():
            if rule not in rules:
                continue
            logs = _train_logs(os.path.join(tmp, f"train_{rule}"), device, train_steps, rule)
            all_logs = _gather(logs)
            step_logs = [log for log in logs if "tip/kept_frac" in log]
            row = {
                "rule": rule,
                "steps": len(step_logs),
                "finite": all(torch.isfinite(torch.tensor(log["loss"])) for log in step_logs),
                "same_logs": all(entry == all_logs[0] for entry in all_logs),
                "kept_frac": [log["tip/kept_frac"] for log in step_logs],
                "last": {k: round(v, 6) for k, v in logs[-2].items()} if len(logs) > 1 else logs,
            }
            row["passed"] = row["same_logs"] and row["steps"] == train_steps and row["finite"]
            if rule == "rank0_keeps_nothing" and world_size > 1:
                # Rank 0 kept nothing, rank 1 everything: the logged share is strictly between 0 and 1.
                row["passed"] &= all(0.0 < frac < 1.0 for frac in row["kept_frac"])
            report["passed"] &= row["passed"]
            report["train"].append(row)
    return report


def report_lines(report: dict) -> list[str]:
    """The summary rank 0 prints: one line per rule and per `train()` check, then the verdict."""
    lines = [
        f"rule={r['rule']}: thresholds equal on all ranks={r['same_thresholds']}, = 1-process "
        f"({r['reference_thresholds'][0]:.6f}, {r['reference_thresholds'][1]:.6f}): {r['close_thresholds']}; "
        f"stats equal on all ranks={r['same_stats']}, max rel diff to 1-process={r['stat_diff']:.2e}; "
        f"loss {r['loss']:.8f} vs 1-process {r['reference_loss']:.8f} (diff {r['loss_diff']:.2e}); "
        f"grad max rel diff {r['grad_diff']:.2e} -> {'PASS' if r['passed'] else 'FAIL'}"
        for r in report["rules"]
    ]
    lines += [
        f"train() rule={t['rule']}: {t['steps']} DDP steps with generation, finite loss={t['finite']}, tip/* logs "
        f"identical on all ranks={t['same_logs']}; last: " + json.dumps(t["last"])
        for t in report["train"]
    ]
    return [*lines, f"DDP CHECK {'PASSED' if report['passed'] else 'FAILED'}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder of the one-process reference (written or read)")
    parser.add_argument("--reference", action="store_true", help="compute the one-process reference")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--train_steps", type=int, default=2, help="steps of the DDP train() check (0: skip)")
    parser.add_argument("--json", default=None, help="rank 0 writes the report (see `check`) to this JSON file")
    ns = parser.parse_args(argv)
    if ns.reference and ns.device == "cuda" and "WORLD_SIZE" not in os.environ:
        # One process must see one GPU: with several, `Trainer` would use nn.DataParallel, which TRL refuses.
        # Set before CUDA is initialised (importing torch does not initialise it).
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    report = check(ns.out, ns.reference, ns.device, ns.train_steps)
    if ns.reference:
        return 0
    if not dist.is_initialized() or dist.get_rank() == 0:
        print("\n".join(report_lines(report)), flush=True)
        if ns.json:
            with open(ns.json, "w") as fh:
                json.dump(report, fh, indent=1)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
