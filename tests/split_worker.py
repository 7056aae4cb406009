"""Worker of `test_loss_contract.py::test_two_processes_give_the_one_process_gradient` (run it through that test).

With `--reference` (one process) it writes, per trainer and rule, the gradient of one optimizer step on the four rows
of `test_loss_contract.LENGTHS` as one micro-batch. Under `torch.distributed.run --nproc_per_node 2` (gloo), each
process takes two of the rows as two micro-batches of one, the gradients are averaged over the processes as DDP
averages them, and every rank compares with the reference: `PASS <trainer> <rule>` or `FAIL ...`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from test_loss_contract import LENGTHS, RULES, _dist_trainer, _gkd_micro_batches, _gkd_trainer, _rows  # noqa: E402

from trl_tip.toy import make_tokenizer  # noqa: E402


def _gkd(trainer, rows: list[int]) -> dict[str, torch.Tensor]:
    model = trainer.model
    model.train()
    model.zero_grad()
    singles = _gkd_micro_batches(len(make_tokenizer()), (1,) * len(LENGTHS))
    batches, count = trainer.get_batch_samples(iter([singles[r] for r in rows]), len(rows), "cpu")
    assert int(count) == sum(LENGTHS), int(count)
    for batch in batches:
        trainer.compute_loss(model, batch, num_items_in_batch=count).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _dist(trainer, rows: list[int]) -> dict[str, torch.Tensor]:
    model = trainer.model
    model.train()
    model.zero_grad()
    prompt_ids, completion_ids, completion_mask = _rows(len(trainer.processing_class))
    # As after TRL's generation: this process's rows of the step, trained as one micro-batch each.
    trainer._tip_count_step([completion_mask[rows]], micro_batches=len(rows))
    for r in rows:
        inputs = {
            "prompt_ids": prompt_ids[r : r + 1],
            "prompt_mask": torch.ones_like(prompt_ids[r : r + 1]),
            "completion_ids": completion_ids[r : r + 1],
            "completion_mask": completion_mask[r : r + 1],
            "num_items_in_batch": completion_mask.sum(),  # TRL's count of the step over all processes
        }
        trainer.compute_loss(model, inputs).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--reference", action="store_true")
    ns = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    reference_path = os.path.join(ns.out, "split_reference.pt")
    results, failures = {}, 0
    reference = None if ns.reference else torch.load(reference_path, weights_only=True)
    rows = list(range(len(LENGTHS))) if ns.reference else list(range(rank, len(LENGTHS), world))
    with tempfile.TemporaryDirectory() as tmp:
        for kind, build, step in (("gkd", _gkd_trainer, _gkd), ("distillation", _dist_trainer, _dist)):
            for i, (rule, options) in enumerate(RULES):
                key = f"{kind}/{rule}-{i}"
                trainer = build(Path(tmp) / key, rule, options)
                grads = step(trainer, rows)
                if world > 1:  # as DDP: the processes' gradients averaged
                    for grad in grads.values():
                        dist.all_reduce(grad)
                        grad /= world
                results[key] = grads
                if reference is not None:
                    worst = max(
                        float((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12))
                        for n, g in reference[key].items()
                    )
                    ok = worst < 1e-5 and grads.keys() == reference[key].keys()
                    failures += not ok
                    print(
                        f"[rank {rank}/{world}] {'PASS' if ok else 'FAIL'} {key} rows={rows} max rel diff {worst:.2e}"
                    )
    if ns.reference:
        torch.save(results, reference_path)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
