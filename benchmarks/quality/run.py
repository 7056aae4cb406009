"""Does selected-token distillation match all-token distillation on a real task? (issue 7)

Three-digit addition with a short chain of thought (`task.py`). A teacher (Qwen2 from config) is trained with
plain next-token loss until it is clearly good, a smaller student briefly on the same data so it is competent but
clearly worse; then the same initial student is distilled on-policy (lmbda=1) from the same teacher by TRL's
`GKDTrainer` (all tokens) and by `TIPTrainer` with each selection rule, same steps, same seeds. Greedy exact match
of the final answer on a held-out test set is the score. Weights are made here, seeded; nothing is downloaded or
saved. Results are written after every run to `--out` (JSON), with a markdown table and a PNG plot at the end.

    python benchmarks/quality/run.py --out runs/quality          # GPU
    python benchmarks/quality/run.py --smoke --out /tmp/q        # CPU, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from task import answer_of, make_splits  # noqa: E402
from transformers import PrinterCallback  # noqa: E402

from trl_tip import TIPConfig, TIPTrainer  # noqa: E402
from trl_tip._compat import GKDConfig, GKDTrainer  # noqa: E402
from trl_tip.toy import make_model, make_tokenizer  # noqa: E402


# (name, trainer, token_selection, extra TIPConfig fields)
RULES = [
    ("GKD (all tokens)", "gkd", None, {}),
    ("TIP all", "tip", "all", {}),
    ("random 0.5", "tip", "random", {"keep_ratio": 0.5}),
    ("entropy_topk 0.5", "tip", "entropy_topk", {"keep_ratio": 0.5}),
    ("entropy_sample 0.5", "tip", "entropy_sample", {"keep_ratio": 0.5}),
    ("quadrants Q3", "tip", "quadrants", {"quadrants": ["Q3"]}),
    ("tip 0.2", "tip", "tip", {"keep_ratio": 0.2}),
    ("sstoken 0.6", "tip", "sstoken", {"keep_ratio": 0.6}),
]


def log(msg: str, start: float) -> None:
    print(f"[{time.time() - start:7.1f}s] {msg}", flush=True)


def encode_sft(tokenizer, dataset, device):
    """Right-padded input ids and labels (-100 on prompt and padding) of the whole dataset."""
    ids, labels = [], []
    for row in dataset:
        prompt = tokenizer.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.append(t)
        labels.append([-100] * len(p) + t[len(p) :])
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    x = torch.tensor([r + [pad] * (width - len(r)) for r in ids], device=device)
    y = torch.tensor([r + [-100] * (width - len(r)) for r in labels], device=device)
    return x, y


@torch.no_grad()
def accuracy(model, tokenizer, test, max_new_tokens: int, batch_size: int = 512) -> float:
    """Greedy exact match of the final answer on `test`."""
    model.eval()
    left = copy.copy(tokenizer)
    left.padding_side = "left"
    prompts = [
        tokenizer.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True) for r in test
    ]
    correct = 0
    for i in range(0, len(prompts), batch_size):
        batch = left(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(model.device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        texts = [decode(tokenizer, row) for row in out[:, batch["input_ids"].shape[1] :].tolist()]
        answers = [answer_of(t) for t in texts]
        correct += sum(a == r for a, r in zip(answers, test[i : i + batch_size]["answer"], strict=True))
    return correct / len(prompts)


def decode(tokenizer, ids: list[int]) -> str:
    """Characters of a completion up to its first end token (the char tokenizer's `decode` adds spaces)."""
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    special = set(tokenizer.all_special_ids)
    return "".join(tokenizer.convert_ids_to_tokens([i for i in ids if i not in special]))


def sft(
    model,
    x,
    y,
    tokenizer_pad,
    steps,
    batch_size,
    lr,
    seed,
    eval_fn=None,
    eval_every=0,
    target=None,
    start=0.0,
    name="",
):
    """Plain next-token training; with `eval_fn`, stop early once its accuracy reaches `target`."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    history = []
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(len(x), (batch_size,), generator=g).to(x.device)
        loss = model(input_ids=x[idx], attention_mask=(x[idx] != tokenizer_pad), labels=y[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if eval_fn is not None and eval_every and step % eval_every == 0:
            acc = eval_fn(model)
            history.append({"step": step, "loss": loss.item(), "acc": acc})
            log(f"{name} step {step} loss {loss.item():.4f} acc {acc:.3f}", start)
            if target is not None and acc >= target:
                break
    model.eval()
    return history


class TokenCounter:
    """Counts, for GKDTrainer, the completion tokens its loss is computed on (all of them)."""

    def __init__(self):
        self.tokens = 0


def make_gkd_counter(counter):
    class CountingGKDTrainer(GKDTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            counter.tokens += int((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

    return CountingGKDTrainer


def distil(rule, student0, teacher, tokenizer, train, test, cfg, seed, out_dir, on_cpu):
    name, kind, selection, extra = rule
    student = copy.deepcopy(student0)
    common = dict(
        output_dir=str(out_dir / "tmp"),
        seed=seed,
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        lmbda=1.0,
        beta=0.5,
        temperature=1.0,
        max_new_tokens=cfg.max_new_tokens,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to="none",
        use_cpu=on_cpu,
        bf16=False,
        disable_tqdm=True,
    )
    counter = TokenCounter()
    if kind == "gkd":
        args = GKDConfig(**common)
        trainer_cls = make_gkd_counter(counter)
    else:
        args = TIPConfig(**common, token_selection=selection, **extra)
        trainer_cls = TIPTrainer
    trainer = trainer_cls(
        model=student, teacher_model=teacher, args=args, train_dataset=train, processing_class=tokenizer
    )
    trainer.remove_callback(PrinterCallback)  # one summary line per run instead of every log
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.time() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    logs = trainer.state.log_history
    if kind == "gkd":
        kept = eligible = counter.tokens
    else:
        step_logs = [entry for entry in logs if "tip/tokens_kept" in entry]
        # tokens_kept/tokens_eligible are per-step means over each logging window
        windows = [cfg.logging_steps] * len(step_logs)
        kept = sum(e["tip/tokens_kept"] * w for e, w in zip(step_logs, windows, strict=True))
        eligible = sum(e["tip/tokens_eligible"] * w for e, w in zip(step_logs, windows, strict=True))
    losses = [entry["loss"] for entry in logs if "loss" in entry]
    acc = accuracy(trainer.model, tokenizer, test, cfg.max_new_tokens)
    return {
        "rule": name,
        "seed": seed,
        "accuracy": acc,
        "tokens_kept": kept,
        "tokens_eligible": eligible,
        "kept_share": kept / eligible if eligible else None,
        "peak_mem_mib": peak,
        "wall_s": wall,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


def summarise(results, bounds):
    """Markdown table: mean ± half-range over seeds."""

    def pm(values, fmt):
        values = [v for v in values if v is not None]
        if not values:
            return "n/a"
        mean = statistics.fmean(values)
        if len(values) == 1:
            return format(mean, fmt)
        return f"{format(mean, fmt)} ± {format((max(values) - min(values)) / 2, fmt)}"

    lines = [
        f"Teacher accuracy {bounds['teacher']:.3f}; initial student {bounds['student']:.3f}.",
        "",
        "| rule | seeds | accuracy | kept share | tokens trained on | peak GPU MiB | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, *_ in RULES:
        rows = [r for r in results if r["rule"] == name]
        if not rows:
            continue
        lines.append(
            f"| {name} | {len(rows)} | {pm([r['accuracy'] for r in rows], '.3f')} | "
            f"{pm([r['kept_share'] for r in rows], '.2f')} | {pm([r['tokens_kept'] for r in rows], '.0f')} | "
            f"{pm([r['peak_mem_mib'] for r in rows], '.0f')} | {pm([r['wall_s'] for r in rows], '.1f')} |"
        )
    return "\n".join(lines)


def plot(results, bounds, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, *_ in RULES:
        rows = [r for r in results if r["rule"] == name]
        if rows:
            xs = [r["kept_share"] for r in rows]
            ys = [r["accuracy"] for r in rows]
            ax.scatter(xs, ys, label=name, alpha=0.8)
    ax.axhline(bounds["teacher"], color="k", ls="--", lw=1, label="teacher")
    ax.axhline(bounds["student"], color="gray", ls=":", lw=1, label="initial student")
    ax.set_xlabel("share of completion tokens trained on")
    ax.set_ylabel("held-out exact match (greedy)")
    ax.set_title("3-digit addition with chain of thought: accuracy vs tokens kept")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--smoke", action="store_true", help="tiny settings for CPU, seconds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rules", nargs="+", default=None, help="subset of rule names (default: all)")
    p.add_argument("--n_train", type=int, default=20000)
    p.add_argument("--n_test", type=int, default=500)
    p.add_argument("--teacher_hidden", type=int, default=256)
    p.add_argument("--teacher_layers", type=int, default=4)
    p.add_argument("--teacher_steps", type=int, default=3000)
    p.add_argument("--teacher_target", type=float, default=0.97)
    p.add_argument("--student_hidden", type=int, default=128)
    p.add_argument("--student_layers", type=int, default=2)
    p.add_argument("--student_steps", type=int, default=3000)
    p.add_argument("--student_target", type=float, default=0.4, help="stop student pre-training at this accuracy")
    p.add_argument("--sft_batch", type=int, default=256)
    p.add_argument("--eval_every", type=int, default=100, help="teacher: steps between held-out evaluations")
    p.add_argument("--student_eval_every", type=int, default=20)
    p.add_argument("--steps", type=int, default=40, help="distillation steps per run")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--logging_steps", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, default=34)
    p.add_argument("--cache", default=None, help="folder for the trained teacher/student (reused when present)")
    p.add_argument("--setup_only", action="store_true", help="train (or load) the pair, print the bounds, stop")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--time_budget", type=float, default=None, help="seconds; skip a seed that would not fit")
    ns = p.parse_args(argv)
    if ns.smoke:
        ns.n_train, ns.n_test = 64, 16
        ns.teacher_hidden, ns.teacher_layers, ns.teacher_steps = 32, 1, 4
        ns.student_hidden, ns.student_layers, ns.student_steps = 32, 1, 2
        ns.sft_batch, ns.eval_every, ns.student_eval_every = 8, 2, 2
        ns.steps, ns.batch, ns.logging_steps = 2, 4, 1
        ns.max_new_tokens, ns.seeds = 8, ns.seeds[:1]
        ns.teacher_target = ns.student_target = None
        ns.rules = ns.rules or ["GKD (all tokens)", "entropy_sample 0.5", "sstoken 0.6"]
    if ns.steps % ns.logging_steps:
        p.error("--steps must be a multiple of --logging_steps (token counts are summed per logging window)")
    return ns


def main(argv=None) -> dict:
    cfg = parse(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    on_cpu = not torch.cuda.is_available()
    device = torch.device("cpu" if on_cpu else "cuda")
    rules = [r for r in RULES if cfg.rules is None or r[0] in cfg.rules]
    if cfg.rules and len(rules) != len(cfg.rules):
        raise ValueError(f"--rules must be among {[r[0] for r in RULES]}, got {cfg.rules}")
    tokenizer = make_tokenizer()
    probe = tokenizer("7+5+0=12 =632<|end|>5", add_special_tokens=False)["input_ids"]
    if answer_of(decode(tokenizer, probe)) != "632":
        raise RuntimeError(f"answer extraction broken: {decode(tokenizer, probe)!r}")
    train, test = make_splits(cfg.n_train, cfg.n_test, seed=1234)
    x, y = encode_sft(tokenizer, train, device)
    log(f"data: {len(train)} train, {len(test)} test, width {x.shape[1]}, device {device}", start)

    def ev(model):
        return accuracy(model, tokenizer, test, cfg.max_new_tokens)

    teacher = make_model(tokenizer, cfg.teacher_hidden, cfg.teacher_layers, seed=1).to(device)
    student0 = make_model(tokenizer, cfg.student_hidden, cfg.student_layers, seed=2).to(device)
    cache = Path(cfg.cache) / "pair.pt" if cfg.cache else None
    if cache is not None and cache.exists():
        saved = torch.load(cache, map_location=device)
        teacher.load_state_dict(saved["teacher"])
        student0.load_state_dict(saved["student"])
        t_hist, s_hist = saved["teacher_history"], saved["student_history"]
        log(f"loaded teacher and student from {cache}", start)
    else:
        t_hist = sft(teacher, x, y, tokenizer.pad_token_id, cfg.teacher_steps, cfg.sft_batch, 1e-3, 1, ev,
                     cfg.eval_every, cfg.teacher_target, start, "teacher")  # fmt: skip
        s_hist = sft(student0, x, y, tokenizer.pad_token_id, cfg.student_steps, cfg.sft_batch, 1e-3, 2, ev,
                     cfg.student_eval_every, cfg.student_target, start, "student")  # fmt: skip
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"teacher": teacher.state_dict(), "student": student0.state_dict(),
                        "teacher_history": t_hist, "student_history": s_hist}, cache)  # fmt: skip
    teacher.eval()
    student0.eval()
    for p_ in teacher.parameters():
        p_.requires_grad_(False)
    bounds = {"teacher": ev(teacher), "student": ev(student0)}
    log(f"bounds: teacher {bounds['teacher']:.3f}, initial student {bounds['student']:.3f}", start)
    if cfg.setup_only:
        return {"bounds": bounds}
    record = {
        "config": {k: v for k, v in vars(cfg).items()},
        "device": torch.cuda.get_device_name() if not on_cpu else "cpu",
        "torch": torch.__version__,
        "bounds": bounds,
        "teacher_history": t_hist,
        "student_history": s_hist,
        "setup_s": time.time() - start,
        "results": [],
        "skipped_seeds": [],
    }
    (out / "quality.json").write_text(json.dumps(record, indent=1))
    seed_times = []
    for seed in cfg.seeds:
        elapsed = time.time() - start
        if cfg.time_budget and seed_times and elapsed + 1.1 * max(seed_times) > cfg.time_budget:
            log(f"skip seed {seed}: {elapsed:.0f}s used, a seed takes ~{max(seed_times):.0f}s", start)
            record["skipped_seeds"].append(seed)
            continue
        t_seed = time.time()
        for rule in rules:
            random.seed(seed)
            res = distil(rule, student0, teacher, tokenizer, train, test, cfg, seed, out, on_cpu)
            record["results"].append(res)
            (out / "quality.json").write_text(json.dumps(record, indent=1))
            log(f"seed {seed} {res['rule']}: acc {res['accuracy']:.3f} share {res['kept_share']:.2f} "
                f"tokens {res['tokens_kept']:.0f} wall {res['wall_s']:.1f}s peak {res['peak_mem_mib']}", start)  # fmt: skip
        seed_times.append(time.time() - t_seed)
    table = summarise(record["results"], bounds)
    record["table"] = table
    record["total_s"] = time.time() - start
    (out / "quality.json").write_text(json.dumps(record, indent=1))
    (out / "quality.md").write_text(table + "\n")
    plot(record["results"], bounds, out / "quality.png")
    print(table, flush=True)
    return record


if __name__ == "__main__":
    main()
