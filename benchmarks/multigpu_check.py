"""Multi-GPU check of both trl-tip trainers under DDP, DeepSpeed ZeRO-2/3 and FSDP2 (launch it with `accelerate`).

For each rule it trains a few steps with on-policy generation (learning rate 0, so the weights stay the initial
ones), then computes on a fixed batch the loss (mean over ranks, each rank taking its share of the rows) and the norm
of the full gradient after the backward (gathered from the shards: `DTensor.full_tensor()` under FSDP2,
`deepspeed.utils.safe_get_full_grad` under DeepSpeed), and compares both with a one-process reference (`--reference`,
one GPU, same models and batch). It checks that the `tip/...` logs are identical on every rank, records the peak GPU
memory of training, and, with `--resume`, that a run resumed from the step-2 checkpoint (sharded under FSDP2 and
ZeRO-3) restores the selection state and logs the same step-3 `tip/...` metrics as the uninterrupted run. Rank 0
prints one PASS/FAIL row per rule and writes a JSON.

    # the one-process reference (one GPU), then each launch config
    CUDA_VISIBLE_DEVICES=0 python benchmarks/multigpu_check.py --reference --trainer gkd --out /tmp/mg
    accelerate launch --config_file recipes/accelerate/deepspeed_zero3.yaml benchmarks/multigpu_check.py \\
        --trainer gkd --out /tmp/mg --label zero3 --resume
    # CPU (gloo, DDP) smoke run of the logic:
    python benchmarks/multigpu_check.py --reference --trainer gkd --out /tmp/mg --cpu
    python -m torch.distributed.run --nproc_per_node 2 benchmarks/multigpu_check.py --trainer gkd --out /tmp/mg --cpu

Exits with status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import traceback


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


NUM_ROWS = 8
LOSS_RTOL = 2e-2  # bf16 matmuls on different shard layouts
GRAD_RTOL = 5e-2
STAT_RTOL = 1e-3


def parse_rule(spec: str) -> dict:
    """`name[:keep_ratio]`, e.g. `all`, `tip:0.5`, `q3_score:0.1`."""
    name, _, value = spec.partition(":")
    options = {"token_selection": name}
    if value:
        options["keep_ratio"] = float(value)
    return options


def _tokenizer():
    from trl_tip.toy import make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


def _models(tokenizer, ns):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def build(seed, width, layers):
        torch.manual_seed(seed)
        config = Qwen2Config(
            vocab_size=ns.vocab, hidden_size=width, intermediate_size=width * 3, num_hidden_layers=layers,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        )  # fmt: skip
        model = Qwen2ForCausalLM(config)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model

    return build(1, ns.student_width, ns.layers), build(2, ns.teacher_width, ns.layers)


def _world_size() -> int:
    """The number of processes of this launch (`WORLD_SIZE`, set by torchrun/accelerate), before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _trainer(kind: str, rule: dict, output_dir: str, ns, steps: int, save: bool, **options):
    from datasets import Dataset

    from trl_tip import TIPConfig, TIPDistillationConfig, TIPDistillationTrainer, TIPTrainer
    from trl_tip.toy import arithmetic_dataset

    tokenizer = _tokenizer()
    student, teacher = _models(tokenizer, ns)
    common = dict(
        output_dir=output_dir, use_cpu=ns.cpu, bf16=not ns.cpu, seed=0, max_steps=steps,
        per_device_train_batch_size=NUM_ROWS // _world_size(), learning_rate=0.0,
        optim="adamw_torch", logging_steps=1, report_to="none", disable_tqdm=True, gradient_checkpointing=False,
        save_strategy="steps" if save else "no", save_steps=2, save_only_model=False, **rule, **options,
    )  # fmt: skip
    rows = arithmetic_dataset(64, seed=7, max_operand=999)
    if kind == "gkd":
        args = TIPConfig(**common, lmbda=1.0, beta=1.0, max_new_tokens=ns.new_tokens)
        return TIPTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=rows, processing_class=tokenizer
        )
    args = TIPDistillationConfig(**common, beta=1.0, max_completion_length=ns.new_tokens)
    data = Dataset.from_list([{"prompt": r["messages"][:1]} for r in rows])
    return TIPDistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tokenizer
    )


def _fixed_batch(kind: str, vocab: int) -> dict[str, torch.Tensor]:
    """The same fixed batch for every world size: random prompts (one left-padded) and 24-token completions (one
    ending early), long enough that the rollout budget of `q3_score` 10% keeps tokens in every row (`floor(0.1 n)`)."""
    g = torch.Generator().manual_seed(5)
    completion_ids = torch.randint(4, min(vocab, 100), (NUM_ROWS, 24), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 14:] = 0
    prompt_ids = torch.randint(4, min(vocab, 100), (NUM_ROWS, 6), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[2, :2] = 0
    if kind == "gkd":  # GKD's collated form: labels -100 outside the completions
        input_ids = torch.cat([prompt_ids, completion_ids], 1)
        labels = torch.cat(
            [torch.full_like(prompt_ids, -100), completion_ids.masked_fill(completion_mask == 0, -100)], 1
        )
        return {
            "input_ids": input_ids,
            "attention_mask": torch.cat([prompt_mask, completion_mask], 1),
            "labels": labels,
        }
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }


def _rows(rank: int, world: int) -> slice:
    per = NUM_ROWS // world
    return slice(rank * per, (rank + 1) * per)


def _grad_norm(trainer) -> float:
    """Norm of the full gradient of the student (gathered from shards)."""
    model = trainer.model_wrapped
    total = 0.0
    if trainer.is_deepspeed_enabled:
        from deepspeed.utils import safe_get_full_grad

        for p in model.module.parameters():
            grad = safe_get_full_grad(p)
            if grad is not None:
                total += float(grad.double().pow(2).sum())
        return math.sqrt(total)
    from torch.distributed.tensor import DTensor

    for p in trainer.model.parameters():
        if p.grad is None:
            continue
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        total += float(grad.double().pow(2).sum())
    return math.sqrt(total)  # DDP: every rank holds the averaged full gradient


def _fixed_batch_loss_and_grad(kind: str, trainer, ns) -> tuple[float, float]:
    acc = trainer.accelerator
    batch = _fixed_batch(kind, ns.vocab)
    count = (batch["labels"][:, 1:] != -100).sum() if kind == "gkd" else batch["completion_mask"].sum()
    rows = _rows(acc.process_index, acc.num_processes) if not ns.reference else slice(0, NUM_ROWS)
    local = {k: v[rows].to(acc.device) for k, v in batch.items()}
    model = trainer.model_wrapped
    model.train()
    trainer.optimizer.zero_grad() if trainer.optimizer is not None else None
    with trainer.compute_loss_context_manager():
        if kind == "gkd":
            loss = trainer.compute_loss(model, local, num_items_in_batch=count.to(acc.device))
        else:
            local["num_items_in_batch"] = count.to(acc.device)
            loss = trainer.compute_loss(model, local)
    if trainer.is_deepspeed_enabled:
        # The engine's backward only: accelerate's would also run `engine.step()`, which zeroes the gradients that
        # `safe_get_full_grad` reads ("only available immediately after backward and before engine step").
        model.backward(loss)
    else:
        acc.backward(loss)
    value = loss.detach().double().reshape(1)
    if acc.num_processes > 1:
        value = acc.reduce(value, reduction="mean")
    return float(value), _grad_norm(trainer)


def _engine(trainer) -> str:
    """What actually wrapped the student: DeepSpeed's ZeRO stage, FSDP2 (`fully_shard`), DDP or a plain module."""
    model = trainer.model_wrapped
    if trainer.is_deepspeed_enabled:
        return f"DeepSpeed ZeRO-{model.zero_optimization_stage()}"
    from torch.distributed.fsdp import FSDPModule

    if isinstance(trainer.model, FSDPModule):
        sharded = sum(isinstance(m, FSDPModule) for m in trainer.model.modules())
        return f"FSDP2 ({sharded} fully_shard groups)"
    return type(model).__name__


def _tip_logs(trainer) -> list[dict]:
    return [
        {k: v for k, v in log.items() if k.startswith("tip/") or k in ("loss", "step")}
        for log in trainer.state.log_history
        if "tip/kept_frac" in log
    ]


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(b), 1e-12)


def _logs_close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(_close(a[k], b[k], STAT_RTOL) or abs(a[k] - b[k]) < 1e-6 for k in a)


def run_rule(kind: str, spec: str, ns) -> dict:
    from trl_tip.trainers.checkpoint import TIP_STATE_NAME

    rule = parse_rule(spec)
    out_dir = os.path.join(ns.out, f"{ns.label}_{kind}_{spec.replace(':', '_')}")
    cuda = torch.cuda.is_available() and not ns.cpu
    # The rows run in one process: collect the previous rows' trainers first (their cycles, DeepSpeed's engines) so
    # that the peak is this row's, and report what was still resident, which the peak includes.
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")
    trainer = _trainer(kind, rule, out_dir, ns, ns.steps, save=ns.resume)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    logs = _tip_logs(trainer)
    loss, grad = _fixed_batch_loss_and_grad(kind, trainer, ns)
    result = {
        "logs": logs, "loss": loss, "grad_norm": grad, "peak_gib": peak, "resident_before_gib": resident,
        "engine": _engine(trainer),
    }  # fmt: skip
    if ns.resume and not ns.reference:
        checkpoint = os.path.join(out_dir, "checkpoint-2")
        saved = torch.load(
            os.path.join(checkpoint, TIP_STATE_NAME.format(rank=trainer.accelerator.process_index)),
            map_location="cpu",
            weights_only=True,
        )
        del trainer
        resumed = _trainer(kind, rule, out_dir, ns, ns.steps, save=False)
        restored = {}
        original_load = resumed._load_tip_state

        def load_and_capture(path):
            original_load(path)
            restored.update(resumed.tip_engine.state_dict())

        resumed._load_tip_state = load_and_capture
        resumed.train(resume_from_checkpoint=checkpoint)
        same_state = bool(restored) and all(
            torch.equal(saved["statistics"][k], restored["statistics"][k].cpu()) for k in saved["statistics"]
        )
        same_state = same_state and list(saved["micro"]) == list(restored["micro"])
        resumed_logs = _tip_logs(resumed)
        step3 = [log for log in resumed_logs if log.get("step") == ns.steps]
        original3 = [log for log in logs if log.get("step") == ns.steps]
        result["resume"] = {
            "state_restored": same_state,
            "step_logs_equal": bool(step3 and original3 and _logs_close(step3[-1], original3[-1])),
            "steps": resumed.state.global_step,
        }
    if not ns.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return result


def _gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


FAST_GENERATION_REFUSAL = "fast_generation=True cannot be used here: the student is sharded by"


def _sharded_weights() -> bool:
    """Whether this launch shards the weights (FSDP, DeepSpeed ZeRO-3), read from what `accelerate launch` set."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return True
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return deepspeed and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"


def check_fast_generation(ns) -> tuple[bool, str]:
    """`TIPTrainer` with `fast_generation=True` under this launch: docs/generation.md says it is refused with a
    ValueError under FSDP and DeepSpeed ZeRO-3 (no silent fallback), and accepted elsewhere on CUDA; with
    `--fast-generation-steps N` an accepted trainer also trains N steps (compiled decode) to finite losses."""
    expected = "refused" if _sharded_weights() else "accepted"
    out_dir = os.path.join(ns.out, f"{ns.label}_fast_generation")
    try:
        trainer = _trainer(
            "gkd", {"token_selection": "all"}, out_dir, ns, max(ns.fast_generation_steps, 1), save=False,
            fast_generation=True,
        )  # fmt: skip
    except ValueError as exc:
        if FAST_GENERATION_REFUSAL in str(exc):
            return expected == "refused", f"refused (ValueError: {str(exc)[:120]}...), expected {expected}"
        return False, f"ValueError other than the documented refusal: {exc}"
    if expected == "refused":
        return False, "accepted, but docs/generation.md says FSDP and ZeRO-3 refuse it"
    text = "accepted, as documented"
    if ns.fast_generation_steps:
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        ok = len(losses) == ns.fast_generation_steps and all(math.isfinite(x) for x in losses)
        text += f"; trained {len(losses)} compiled-generation steps, losses {[round(x, 6) for x in losses]}"
        if not ok:
            return False, text
    shutil.rmtree(out_dir, ignore_errors=True)
    return True, text


TABLE_HEADER = (
    "| config | processes | trainer | rule | training | fixed-batch loss vs 1 process | gradient norm vs 1 process | "
    "peak GiB per GPU (resident before the row) | resume | result |\n|---|---|---|---|---|---|---|---|---|---|"
)


def _rows_for(kind: str, results: dict, errors: dict, ns, world: int) -> tuple[list[str], bool]:
    """The table rows of one trainer (rank 0's view; every rank must call it: it gathers)."""
    ref_path = os.path.join(ns.out, f"reference_{kind}.json")
    reference = json.load(open(ref_path)) if os.path.isfile(ref_path) else {}
    everyone = _gather_objects({spec: r["logs"] for spec, r in results.items()})
    peaks = _gather_objects({spec: (r["peak_gib"], r["resident_before_gib"]) for spec, r in results.items()})
    ok, rows = not errors, []
    for spec in ns.rules.split(","):
        if spec in errors:
            rows.append(f"| {ns.label} | {world} | {kind} | {spec} | ERROR: {errors[spec][:150]} | | | | | FAIL |")
            continue
        r = results[spec]
        ranks_equal = all(e.get(spec) == r["logs"] for e in everyone)
        finite = all(math.isfinite(log["loss"]) for log in r["logs"]) and len(r["logs"]) == ns.steps
        ref = reference.get(spec)
        loss_ok = ref is not None and _close(r["loss"], ref["loss"], LOSS_RTOL)
        # A zero gradient (no kept token in the fixed batch) would make the comparison vacuous.
        grad_ok = ref is not None and r["grad_norm"] > 0 and _close(r["grad_norm"], ref["grad_norm"], GRAD_RTOL)
        resume = r.get("resume")
        resume_ok = resume is None or (
            resume["state_restored"] and resume["step_logs_equal"] and resume["steps"] == ns.steps
        )
        passed = ranks_equal and finite and loss_ok and grad_ok and resume_ok
        ok &= passed
        peak = "/".join(f"{p[spec][0]:.2f} ({p[spec][1]:.2f} before)" for p in peaks)
        ref_loss = f"{ref['loss']:.6f}" if ref else "n/a"
        ref_grad = f"{ref['grad_norm']:.4f}" if ref else "n/a"
        resume_text = "—" if resume is None else (
            f"state={resume['state_restored']}, step-{ns.steps} logs equal={resume['step_logs_equal']}"
        )  # fmt: skip
        rows.append(
            f"| {ns.label} | {world} | {kind} | {spec} | {r['engine']}: {ns.steps} steps finite={finite}, tip/* equal on ranks="
            f"{ranks_equal} | loss {r['loss']:.6f} vs {ref_loss} | grad norm {r['grad_norm']:.4f} vs {ref_grad} | "
            f"{peak} | {resume_text} | {'PASS' if passed else 'FAIL'} |"
        )
    return rows, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", default="gkd", help="gkd, distillation, or both comma-separated")
    parser.add_argument("--rules", default="all,tip:0.5,q3_score:0.1")
    parser.add_argument("--out", required=True)
    parser.add_argument("--label", default="ddp", help="name of the launch config, for the table and files")
    parser.add_argument("--reference", action="store_true", help="one process: write the reference JSON")
    parser.add_argument("--resume", action="store_true", help="also check checkpoint save + resume")
    parser.add_argument(
        "--fast-generation", action="store_true",
        help="also check that TIPTrainer's fast_generation=True is refused (FSDP, ZeRO-3) or accepted as documented",
    )  # fmt: skip
    parser.add_argument(
        "--fast-generation-steps", type=int, default=0, help="train this many steps where fast_generation is accepted"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--student-width", type=int, default=512)
    parser.add_argument("--teacher-width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (gloo): a smoke test of the logic")
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    ns = parser.parse_args()
    kinds = ns.trainer.split(",")
    unknown = sorted(set(kinds) - {"gkd", "distillation"})
    if unknown:
        parser.error(f"--trainer: unknown trainer(s) {unknown}; allowed: gkd, distillation (comma-separated)")
    world = _world_size()
    if ns.reference and world != 1:
        parser.error("--reference runs in one process; launch it with python, not torchrun/accelerate")
    if NUM_ROWS % world:
        parser.error(f"the check splits {NUM_ROWS} rows evenly over the processes: use 1, 2, 4 or 8, not {world}")
    if ns.cpu and ns.fast_generation:
        parser.error("--fast-generation needs CUDA (fast_generation=True is refused with use_cpu=True)")
    if ns.cpu:
        ns.vocab, ns.student_width, ns.teacher_width, ns.layers, ns.new_tokens = 128, 32, 48, 2, 6
    os.makedirs(ns.out, exist_ok=True)
    all_results, all_errors = {}, {}
    for kind in kinds:
        results, errors = {}, {}
        for spec in ns.rules.split(","):
            try:
                results[spec] = run_rule(kind, spec, ns)
            except Exception as exc:  # one failing rule must not hide the others' results
                errors[spec] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
        all_results[kind], all_errors[kind] = results, errors
    rank = dist.get_rank() if dist.is_initialized() else 0
    if ns.reference:
        for kind in kinds:
            with open(os.path.join(ns.out, f"reference_{kind}.json"), "w") as f:
                json.dump(
                    {
                        spec: {k: r[k] for k in ("loss", "grad_norm", "logs", "peak_gib")}
                        for spec, r in all_results[kind].items()
                    },
                    f,
                )
            print(f"reference {kind}: {json.dumps(all_results[kind], default=str)[:2000]}")
        return 0 if not any(all_errors.values()) else 1
    ok, rows = True, []
    for kind in kinds:
        kind_rows, kind_ok = _rows_for(kind, all_results[kind], all_errors[kind], ns, world)
        rows += kind_rows
        ok &= kind_ok
    if rank == 0:  # printed now: a fast_generation check that hangs must not hide them
        print("\n" + TABLE_HEADER + "\n" + "\n".join(rows), flush=True)
    fast = None
    if ns.fast_generation:
        try:
            fast = check_fast_generation(ns)
        except Exception as exc:
            traceback.print_exc()
            fast = (False, f"{type(exc).__name__}: {exc}")
        ok &= fast[0]
        rows.append(
            f"| {ns.label} | {world} | gkd | fast_generation=True | {fast[1]} | | | | | {'PASS' if fast[0] else 'FAIL'} |"
        )
        if rank == 0:
            print(rows[-1], flush=True)
    if rank == 0:
        with open(os.path.join(ns.out, f"result_{ns.label}.json"), "w") as f:
            payload = {"processes": world, "rows": rows, "results": all_results, "errors": all_errors}
            json.dump({**payload, "fast_generation": fast}, f, default=str)
        print(f"MULTIGPU CHECK {ns.label} {ns.trainer}", "PASSED" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
