"""FSDP2 check on CPU (gloo): both trl-tip trainers with `fully_shard`-ed student and teacher give the one-process loss
and gradients.

Accelerate runs FSDP only on accelerators (on a CPU it falls back to DDP), so this check shards the models itself with
`torch.distributed.fsdp.fully_shard` (each decoder layer, then the root), exactly as accelerate's FSDP2 plugin does,
and calls the trainers' `compute_loss` on them. It exercises what FSDP2 changes for trl-tip: the student's loss runs
inside its (redirected) forward, where the root's parameters — `lm_head` included — are unsharded; the teacher's
forward runs through its module so FSDP2 gathers its layers; its head is a DTensor afterwards and is gathered once per
micro-batch (`OutputHead`); the student's gradient reaches the shards through FSDP2's reduce-scatter.

Every rank first computes the one-process reference itself (unsharded copies of the same models, the whole batch, a
single-process engine); then each rank takes its share of the rows (unequal token counts), computes the loss on the
sharded models with the step's token count over all ranks, and backpropagates. Rank 0 prints one line per trainer and
rule and a PASS/FAIL table: the mean over ranks of the losses equals the reference loss, and the full gradients
(`DTensor.full_tensor()` of the reduce-scattered shards) equal the reference gradients, and the student's sharded
`lm_head` was never called as a module (its weight is read: a call re-enters FSDP2's (norm, embeddings, lm_head)
group, which on a GPU freed the norm's weights before their backward).

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/fsdp2_cpu_check.py [--json report.json]

`--json FILE` writes the report's rows (`check`'s return values) for tests and tools. Exits with status 1 if a check
fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


RULES = {
    "all": {"token_selection": "all"},
    "entropy_topk": {"token_selection": "entropy_topk", "keep_ratio": 0.5},
    "quadrants_q3": {"token_selection": "quadrants", "quadrants": ["Q3"]},
}
NUM_ROWS = 6
RTOL = 1e-4


SHARDINGS = {
    # accelerate 1.15's FSDP2 layout: each decoder layer, then (norm, embeddings, lm_head) as one group kept unsharded
    # after the forward, then the root (PyTorch's default: not resharded after the forward).
    "accelerate": (False, None),
    # Everything resharded after every forward: the teacher's head is a DTensor when the loss reads it, so the
    # gather-once path (`OutputHead`) is exercised.
    "reshard_all": (True, None),
    # The same with bf16 mixed precision as accelerate (1.15) sets it for `mixed_precision: bf16`
    # (`MixedPrecisionPolicy(param_dtype=bf16, output_dtype=bf16)`): the shards stay float32 while the hidden states
    # are bf16, so a gathered head must be cast to bf16 (it raised a dtype mismatch before); the forward's outputs are
    # cast to bf16, the loss computed inside it among them (TIPTrainer gives back its float32 value). Compared with the
    # float32 reference at bf16 tolerances.
    "reshard_all_bf16": (True, torch.bfloat16),
}
# Relative tolerance of the loss and of the worst gradient, by the sharding's compute dtype.
TOLERANCES = {None: (RTOL, RTOL), torch.bfloat16: (2e-2, 6e-2)}


def _shard(model, mesh, reshard: bool, dtype: torch.dtype | None = None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = {}
    if dtype is not None:
        policy["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, output_dtype=dtype)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, **policy)
    group = [model.model.norm, model.model.embed_tokens, model.lm_head]
    fully_shard(group, mesh=mesh, reshard_after_forward=reshard, **policy)
    fully_shard(model, mesh=mesh, **({"reshard_after_forward": True} if reshard else {}), **policy)
    return model


def _rows(rank: int, world: int) -> slice:
    """Unequal shares: rank 0 takes one row fewer than an even split."""
    bounds = [0] + [NUM_ROWS * (r + 1) // world - (1 if r == 0 else 0) for r in range(world)]
    bounds[-1] = NUM_ROWS
    return slice(bounds[rank], bounds[rank + 1])


def _gkd(rule: str, output_dir: str):
    from trl_tip import TIPConfig, TIPTrainer
    from trl_tip.toy import arithmetic_dataset, make_model, make_tokenizer

    tokenizer = make_tokenizer()
    args = TIPConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, seed=0, per_device_train_batch_size=NUM_ROWS, lmbda=0.0,
        beta=0.5, report_to="none", save_strategy="no", gradient_checkpointing=False, tip_chunk_size=5,
        **RULES[rule],
    )  # fmt: skip
    data = arithmetic_dataset(NUM_ROWS, seed=3, max_operand=999)
    trainer = TIPTrainer(
        model=make_model(tokenizer, 32, 2, seed=1),
        teacher_model=make_model(tokenizer, 48, 2, seed=2),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([data[i] for i in range(NUM_ROWS)])
    return trainer, batch


def _distillation(rule: str, output_dir: str):
    from datasets import Dataset

    from trl_tip import TIPDistillationConfig, TIPDistillationTrainer
    from trl_tip.toy import arithmetic_dataset, make_model, make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left"
    args = TIPDistillationConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, seed=0, per_device_train_batch_size=NUM_ROWS, beta=1.0,
        report_to="none", save_strategy="no", gradient_checkpointing=False, tip_chunk_size=5, **RULES[rule],
    )  # fmt: skip
    data = Dataset.from_list([{"prompt": r["messages"][:1]} for r in arithmetic_dataset(NUM_ROWS, seed=3)])
    trainer = TIPDistillationTrainer(
        model=make_model(tokenizer, 32, 2, seed=1),
        teacher_model=make_model(tokenizer, 48, 2, seed=2),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
    )
    g = torch.Generator().manual_seed(5)
    vocab = len(tokenizer)
    completion_ids = torch.randint(4, vocab, (NUM_ROWS, 7), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 3:] = 0
    completion_mask[4, 5:] = 0
    prompt_ids = torch.randint(4, vocab, (NUM_ROWS, 5), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[2, :2] = 0
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }
    return trainer, batch


def _count(kind: str, batch) -> torch.Tensor:
    if kind == "gkd":
        return (batch["labels"][:, 1:] != -100).sum()
    return batch["completion_mask"].sum()


def _loss(kind: str, trainer, model, batch, count):
    inputs = dict(batch)
    if kind == "gkd":
        return trainer.compute_loss(model, inputs, num_items_in_batch=count)
    inputs["num_items_in_batch"] = count  # TRL's compute_loss divides it by the process count
    return trainer.compute_loss(model, inputs)


def _full_grads(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[name] = g.detach().double().clone()
    return grads


def check(kind: str, rule: str, sharding: str, mesh) -> dict:
    """One trainer, rule and sharding: this rank's row of the report (`loss`, `reference_loss`, `worst_grad_diff`,
    `passed`), the loss being the mean over ranks."""
    from trl_tip.selection.context import Processes

    rank, world = dist.get_rank(), dist.get_world_size()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, batch = (_gkd if kind == "gkd" else _distillation)(rule, tmp)
        count = _count(kind, batch)

        # The one-process reference, on unsharded copies with a single-process engine.
        engine = trainer.tip_engine
        student, teacher = trainer.model, trainer.teacher_model
        ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
        engine.processes = Processes()
        trainer.model, trainer.teacher_model = ref_student, ref_teacher
        ref_student.train()
        # The trainers divide the step's count by the accelerator's process count (DDP/FSDP average the ranks'
        # gradients); this single-process reference runs inside the 2-process launch, so it undoes that division.
        ref_loss = _loss(kind, trainer, ref_student, batch, count * world)
        ref_loss.backward()
        ref_grads = _full_grads(ref_student)
        engine.statistics.reset()

        # The sharded run: this rank's rows, the step's count over all ranks.
        engine.processes = Processes(trainer.accelerator)
        reshard, dtype = SHARDINGS[sharding]
        trainer.model = _shard(student, mesh, reshard, dtype)
        trainer.teacher_model = _shard(teacher, mesh, reshard, dtype)
        trainer.model.train()
        rows = _rows(rank, world)
        local = {k: v[rows] for k, v in batch.items()}
        # The student's `lm_head` (a plain linear layer, `FSDPLinear` once sharded) must be read through its weight,
        # never called: each call re-enters FSDP2's group of (norm, embeddings, lm_head), whose post-backward then
        # frees the norm's weights before the norm's backward (an illegal memory access on a GPU).
        head_calls = []
        hook = trainer.model.lm_head.register_forward_pre_hook(lambda *args: head_calls.append(1))
        loss = _loss(kind, trainer, trainer.model, local, count)
        loss.backward()
        hook.remove()
        grads = _full_grads(trainer.model)
        mean_loss = loss.detach().double().reshape(1)
        dist.all_reduce(mean_loss)
        mean_loss /= world

    loss_rtol, grad_rtol = TOLERANCES[dtype]
    loss_ok = torch.allclose(mean_loss, ref_loss.detach().double().reshape(1), rtol=loss_rtol, atol=1e-8)
    names_ok = grads.keys() == ref_grads.keys() and len(grads) > 0
    worst = max(float((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-30)) for n in grads)
    grads_ok = names_ok and worst < grad_rtol
    ok = bool(loss_ok and grads_ok and not head_calls)
    print(
        f"[rank {rank}/{world}] trainer={kind} rule={rule} sharding={sharding} rows={rows.start}..{rows.stop - 1} loss(mean over ranks)="
        f"{float(mean_loss):.8f} reference={float(ref_loss):.8f} worst grad rel diff={worst:.2e} "
        f"student lm_head calls={len(head_calls)} "
        f"-> {'PASS' if ok else 'FAIL'}",
        flush=True,
    )
    return {
        "trainer": kind,
        "rule": rule,
        "sharding": sharding,
        "loss": float(mean_loss),
        "reference_loss": float(ref_loss),
        "worst_grad_diff": worst,
        "head_calls": len(head_calls),
        "loss_dtype": str(loss.dtype).removeprefix("torch."),
        "passed": ok,
    }


def run_checks() -> list[dict]:
    """Every trainer, rule and sharding on this rank (of an initialised gloo group); the rows of the report."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return [
        check(kind, rule, sharding, mesh)
        for kind in ("gkd", "distillation")
        for rule in RULES
        for sharding in SHARDINGS
    ]


def report_table(rows: list[dict]) -> str:
    """The PASS/FAIL table rank 0 prints, and the verdict."""
    lines = ["| trainer | rule | sharding | FSDP2 (gloo, CPU) loss + gradients = one process |", "|---|---|---|---|"]
    lines += [
        f"| {r['trainer']} | {r['rule']} | {r['sharding']} | {'PASS' if r['passed'] else 'FAIL'} |" for r in rows
    ]
    passed = all(r["passed"] for r in rows)
    return "\n".join([*lines, "FSDP2 CPU CHECK PASSED" if passed else "FSDP2 CPU CHECK FAILED"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="rank 0 writes the report's rows (see `check`) to this JSON file")
    ns = parser.parse_args(argv)
    dist.init_process_group("gloo")
    rows = run_checks()
    passed = all(r["passed"] for r in rows)
    if dist.get_rank() == 0:
        print("\n" + report_table(rows), flush=True)
        if ns.json:
            with open(ns.json, "w") as fh:
                json.dump({"passed": passed, "world_size": dist.get_world_size(), "rows": rows}, fh, indent=1)
    dist.barrier()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
