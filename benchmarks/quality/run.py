"""Does selected-token distillation match all-token distillation on a real task? (issue 7)

Three-digit addition with a short chain of thought (`task.py`). A teacher (Qwen2 from config) is trained with
plain next-token loss until it is clearly good, a smaller student briefly on the same data so it is competent but
clearly worse; then the same initial student is distilled on-policy (lmbda=1) from the same teacher by TRL's
`GKDTrainer` (all tokens) and by `TIPTrainer` with each selection rule, same steps, same seeds. Greedy exact match
of the final answer on a held-out test set is the score. Weights are made here, seeded; nothing is downloaded (the
pair is saved under `--cache` when given). Results are written after every run to `--out` (JSON), with a markdown
table and a PNG plot at the end. Each TIP run also records the kept share by completion position and a few greedy
completions of the distilled student, which show *where* a rule trains and what a collapsed student writes.

    python benchmarks/quality/run.py --out runs/quality --jobs 8      # GPU, 8 runs at a time
    python benchmarks/quality/run.py --smoke --out /tmp/q             # CPU, seconds
    python benchmarks/quality/run.py ... --add_rule "random 0.1" random '{"keep_ratio": 0.1}' \
        --lr_for "quadrants Q3=5e-5"                                  # an extra rule, a per-rule learning rate
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from task import answer_of, make_splits  # noqa: E402
from transformers import PrinterCallback  # noqa: E402

from trl_tip import SelectionCallback, TIPConfig, TIPTrainer  # noqa: E402
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
    # REL on the divergence: the library's default when the GPU results in docs/quality.md were taken.
    ("sstoken 0.6", "tip", "sstoken", {"keep_ratio": 0.6, "sstoken_loss": "divergence"}),
    ("sstoken 0.6 nll", "tip", "sstoken", {"keep_ratio": 0.6, "sstoken_loss": "nll"}),  # the paper's REL, now default
]
SAMPLES = 4  # greedy completions of the distilled student kept per run


class KeptByPosition(SelectionCallback):
    """Counts, per completion position (0 = first completion token), how many tokens there were and how many kept
    (every training micro-batch)."""

    def __init__(self):
        self.total: collections.Counter = collections.Counter()
        self.kept: collections.Counter = collections.Counter()

    def on_selection(self, record, engine):
        if not record.training:
            return
        labels = record.labels[:, 1:]
        signals = record.signals
        first = (labels != -100).int().argmax(1)
        position = (signals.pos_idx - first[signals.seq_idx]).tolist()
        kept = (record.weights > 0).tolist()
        for p, k in zip(position, kept, strict=True):
            self.total[p] += 1
            self.kept[p] += int(k)

    def shares(self) -> dict[int, float]:
        return {p: self.kept[p] / self.total[p] for p in sorted(self.total)}


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
def accuracy(model, tokenizer, test, max_new_tokens: int, batch_size: int = 512, samples: list | None = None) -> float:
    """Greedy exact match of the final answer on `test`; the first completions are appended to `samples` if given."""
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
        if samples is not None and len(samples) < SAMPLES:
            samples.extend(texts[: SAMPLES - len(samples)])
        correct += sum(a == r for a, r in zip(answers, test[i : i + batch_size]["answer"], strict=True))
    return correct / len(prompts)


def decode(tokenizer, ids: list[int]) -> str:
    """The text of a completion up to its first end token."""
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


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


def distil(rule, setup, cfg, seed, out_dir, on_cpu):
    """Distils a copy of the initial student of `setup` with `rule` and scores it."""
    name, kind, selection, extra = rule
    tokenizer = setup.tokenizer
    student = copy.deepcopy(setup.student)
    lr = cfg.lr_for.get(name, cfg.lr)
    common = dict(
        output_dir=str(out_dir / "tmp" / f"{os.getpid()}"),
        seed=seed,
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch,
        learning_rate=lr,
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
        model=student, teacher_model=setup.teacher, args=args, train_dataset=setup.train, processing_class=tokenizer
    )
    trainer.remove_callback(PrinterCallback)  # one summary line per run instead of every log
    positions = None
    if kind != "gkd":
        positions = KeptByPosition()
        trainer.add_callback(positions)
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
    samples: list[str] = []
    acc = accuracy(trainer.model, tokenizer, setup.test, cfg.max_new_tokens, samples=samples)
    return {
        "rule": name,
        "seed": seed,
        "lr": lr,
        "accuracy": acc,
        "tokens_kept": kept,
        "tokens_eligible": eligible,
        "kept_share": kept / eligible if eligible else None,
        "peak_mem_mib": peak,
        "wall_s": wall,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "kept_by_position": positions.shares() if positions is not None else None,
        "samples": samples,
    }


def summarise(results, bounds, names):
    """Markdown table: mean ± standard deviation over seeds (accuracy also min–max), one row per rule."""

    def pm(values, fmt, span=False):
        values = [v for v in values if v is not None]
        if not values:
            return "n/a"
        mean = statistics.fmean(values)
        if len(values) == 1:
            return format(mean, fmt)
        text = f"{format(mean, fmt)} ± {format(statistics.stdev(values), fmt)}"
        return f"{text} ({format(min(values), fmt)}–{format(max(values), fmt)})" if span else text

    lines = [
        f"Teacher accuracy {bounds['teacher']:.3f}; initial student {bounds['student']:.3f}.",
        "",
        "| rule | lr | seeds | accuracy (min–max) | kept share | tokens trained on | peak GPU MiB | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        rows = [r for r in results if r["rule"] == name]
        if not rows:
            continue
        lines.append(
            f"| {name} | {rows[0]['lr']:g} | {len(rows)} | {pm([r['accuracy'] for r in rows], '.3f', span=True)} | "
            f"{pm([r['kept_share'] for r in rows], '.2f')} | {pm([r['tokens_kept'] for r in rows], '.0f')} | "
            f"{pm([r['peak_mem_mib'] for r in rows], '.0f')} | {pm([r['wall_s'] for r in rows], '.1f')} |"
        )
    seeds = sorted({r["seed"] for r in results})
    lines += ["", "| rule | " + " | ".join(f"seed {s}" for s in seeds) + " |", "| --- |" + " --- |" * len(seeds)]
    for name in names:
        by_seed = {r["seed"]: r["accuracy"] for r in results if r["rule"] == name}
        if by_seed:
            cells = [f"{by_seed[s]:.3f}" if s in by_seed else "—" for s in seeds]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, bounds, names, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = "osD^vP*Xh<>"
    for i, name in enumerate(names):
        rows = [r for r in results if r["rule"] == name]
        if rows:
            xs = [r["kept_share"] for r in rows]
            ys = [r["accuracy"] for r in rows]
            ax.scatter(xs, ys, label=name, alpha=0.75, marker=markers[i % len(markers)])
            ax.errorbar(statistics.fmean(xs), statistics.fmean(ys), fmt="_", color="k", ms=14, alpha=0.6)
    ax.axhline(bounds["teacher"], color="k", ls="--", lw=1, label="teacher")
    ax.axhline(bounds["student"], color="gray", ls=":", lw=1, label="initial student")
    ax.set_xlabel("share of completion tokens trained on")
    ax.set_ylabel("held-out exact match (greedy)")
    ax.set_title("3-digit addition with chain of thought: accuracy vs tokens kept\n(dots: seeds; bars: mean)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# What each completion position holds (every problem is 3 digits + 3 digits; a 3-digit sum ends one earlier).
POSITION_LABELS = list("a+b+c=ss ") * 3 + list("=sss") + ["s/end", "end"]


def plot_positions(results, names, path) -> None:
    """Kept share by completion position (mean over seeds), one line per TIP rule; nothing when no run has them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.2))
    drawn = False
    for name in names:
        # Positions are int keys in memory and str keys once read back from JSON.
        rows = [{int(p): v for p, v in r["kept_by_position"].items()} for r in results
                if r["rule"] == name and r.get("kept_by_position")]  # fmt: skip
        if not rows or name == "TIP all":
            continue
        positions = sorted({p for row in rows for p in row})
        means = [statistics.fmean(row[p] for row in rows if p in row) for p in positions]
        ax.plot(positions, means, marker=".", label=name)
        drawn = True
    if not drawn:
        plt.close(fig)
        return
    ax.set_xticks(range(len(POSITION_LABELS)))
    ax.set_xticklabels(POSITION_LABELS, fontsize=7)
    ax.set_xlabel("completion position (a, b: copied digits, c: carry, s: sum digits, end: end token)")
    ax.set_ylabel("share of tokens kept")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Where each rule trains: kept share by position of the completion (mean over seeds)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--smoke", action="store_true", help="tiny settings for CPU, seconds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rules", nargs="+", default=None, help="subset of rule names (default: all)")
    p.add_argument(
        "--add_rule",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "SELECTION", "JSON"),
        help="an extra TIP rule: its name, token_selection and a JSON object of other TIPConfig fields",
    )
    p.add_argument(
        "--lr_for", action="append", default=[], metavar="NAME=LR", help="learning rate of one rule (repeatable)"
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="DIR",
        help="no training: join the quality.json of these output folders (same pair, settings and rules) into --out",
    )
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
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 per worker with --jobs > 1)")
    p.add_argument("--time_budget", type=float, default=None, help="seconds; runs that would not fit are skipped")
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
    if ns.jobs < 1:
        p.error(f"--jobs must be at least 1, got {ns.jobs}")
    extra_rules = []
    for name, selection, options in ns.add_rule:
        try:
            fields = json.loads(options)
        except json.JSONDecodeError as exc:
            p.error(f"--add_rule {name!r}: JSON must be an object of TIPConfig fields ({exc})")
        if not isinstance(fields, dict):
            p.error(f"--add_rule {name!r}: JSON must be an object of TIPConfig fields, got {options!r}")
        extra_rules.append((name, "tip", selection, fields))
    ns.rule_table = RULES + extra_rules
    names = [r[0] for r in ns.rule_table]
    if len(set(names)) != len(names):
        p.error(f"--add_rule names must differ from each other and from the built-in rules {names[: len(RULES)]}")
    if ns.rules is not None:
        unknown = [r for r in ns.rules if r not in names]
        if unknown:
            p.error(f"--rules {unknown} unknown; allowed: {names}")
    lr_for = {}
    for item in ns.lr_for:
        name, sep, value = item.rpartition("=")
        if not sep or name not in names:
            p.error(f"--lr_for must be NAME=LR with NAME among {names}, got {item!r}")
        try:
            lr_for[name] = float(value)
        except ValueError:
            p.error(f"--lr_for {item!r}: {value!r} is not a number")
    ns.lr_for = lr_for
    return ns


class Setup:
    """What every run needs: the tokenizer, the splits, the frozen teacher and the initial student."""

    def __init__(self, cfg, device, start, log_bounds=True):
        self.max_new_tokens = cfg.max_new_tokens
        self.tokenizer = tokenizer = make_tokenizer()
        self.train, self.test = make_splits(cfg.n_train, cfg.n_test, seed=1234)
        self.teacher = make_model(tokenizer, cfg.teacher_hidden, cfg.teacher_layers, seed=1).to(device)
        self.student = make_model(tokenizer, cfg.student_hidden, cfg.student_layers, seed=2).to(device)
        cache = Path(cfg.cache) / "pair.pt" if cfg.cache else None
        if cache is not None and cache.exists():
            saved = torch.load(cache, map_location=device)
            self.teacher.load_state_dict(saved["teacher"])
            self.student.load_state_dict(saved["student"])
            self.teacher_history, self.student_history = saved["teacher_history"], saved["student_history"]
            if log_bounds:
                log(f"loaded teacher and student from {cache}", start)
        else:
            x, y = encode_sft(tokenizer, self.train, device)
            log(f"data: {len(self.train)} train, {len(self.test)} test, width {x.shape[1]}, device {device}", start)
            pad = tokenizer.pad_token_id
            self.teacher_history = sft(self.teacher, x, y, pad, cfg.teacher_steps, cfg.sft_batch, 1e-3, 1, self.evaluate,
                                       cfg.eval_every, cfg.teacher_target, start, "teacher")  # fmt: skip
            self.student_history = sft(self.student, x, y, pad, cfg.student_steps, cfg.sft_batch, 1e-3, 2,
                                       self.evaluate, cfg.student_eval_every, cfg.student_target, start,
                                       "student")  # fmt: skip
            if cache is not None:
                self.save(cache)
        self.teacher.eval()
        self.student.eval()
        for param in self.teacher.parameters():
            param.requires_grad_(False)

    def evaluate(self, model) -> float:
        """Held-out greedy exact match of `model`."""
        return accuracy(model, self.tokenizer, self.test, self.max_new_tokens)

    def save(self, path: Path) -> None:
        """Writes both models and their training curves to `path`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"teacher": self.teacher.state_dict(), "student": self.student.state_dict(),
                    "teacher_history": self.teacher_history, "student_history": self.student_history},
                   path)  # fmt: skip


_WORKER: dict = {}


def _worker_init(cfg, on_cpu) -> None:
    if on_cpu:
        torch.set_num_threads(1)
    device = torch.device("cpu" if on_cpu else "cuda")
    _WORKER.update(cfg=cfg, on_cpu=on_cpu, setup=Setup(cfg, device, time.time(), log_bounds=False))


def _worker_run(rule, seed, deadline):
    if deadline is not None and time.time() > deadline:
        return None
    cfg, setup = _WORKER["cfg"], _WORKER["setup"]
    random.seed(seed)
    return distil(rule, setup, cfg, seed, Path(cfg.out), _WORKER["on_cpu"])


# Settings that must agree for runs to be merged into one table.
MERGE_KEYS = ("n_train", "n_test", "teacher_hidden", "teacher_layers", "student_hidden", "student_layers", "steps",
              "batch", "lr", "lr_for", "max_new_tokens")  # fmt: skip


def write_outputs(record: dict, names: list[str], out: Path) -> None:
    """Adds the table to `record`, writes quality.json/.md and the two plots to `out`, prints the table."""
    record["table"] = summarise(record["results"], record["bounds"], names)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(record, indent=1))
    (out / "quality.md").write_text(record["table"] + "\n")
    plot(record["results"], record["bounds"], names, out / "quality.png")
    plot_positions(record["results"], names, out / "quality_positions.png")
    print(record["table"], flush=True)


def merge(cfg, out: Path) -> dict:
    """Joins the results of several output folders of the same pair and settings (e.g. more seeds, other rules)."""
    records = [json.loads((Path(d) / "quality.json").read_text()) for d in cfg.merge]
    first = records[0]
    for d, rec in zip(cfg.merge[1:], records[1:], strict=True):
        if rec["bounds"] != first["bounds"]:
            raise ValueError(
                f"{d}: bounds {rec['bounds']} differ from {first['bounds']}; not the same teacher/student"
            )
        differ = [k for k in MERGE_KEYS if rec["config"].get(k) != first["config"].get(k)]
        if differ:
            raise ValueError(f"{d}: settings {differ} differ from {cfg.merge[0]}")
    seen = set()
    results = []
    for d, rec in zip(cfg.merge, records, strict=True):
        for r in rec["results"]:
            key = (r["rule"], r["seed"])
            if key in seen:
                raise ValueError(f"{d}: rule {r['rule']!r} seed {r['seed']} is already in an earlier folder")
            seen.add(key)
            results.append(r)
    names = []
    for rec in records:
        for name, *_ in rec["config"]["rule_table"]:
            if name not in names and any(r["rule"] == name for r in results):
                names.append(name)
    results.sort(key=lambda r: (r["seed"], names.index(r["rule"])))
    record = {**first, "results": results, "merged_from": list(cfg.merge)}
    write_outputs(record, names, out)
    return record


def main(argv=None) -> dict:
    cfg = parse(argv)
    if cfg.merge:
        return merge(cfg, Path(cfg.out))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    on_cpu = not torch.cuda.is_available()
    device = torch.device("cpu" if on_cpu else "cuda")
    rules = [r for r in cfg.rule_table if cfg.rules is None or r[0] in cfg.rules]
    names = [r[0] for r in rules]
    tokenizer = make_tokenizer()
    probe = tokenizer("7+5+0=12 =632<|end|>5", add_special_tokens=False)["input_ids"]
    if answer_of(decode(tokenizer, probe)) != "632":
        raise RuntimeError(f"answer extraction broken: {decode(tokenizer, probe)!r}")
    if cfg.jobs > 1 and not cfg.cache:
        cfg.cache = str(out / "pair_cache")  # the workers load the pair from here
    setup = Setup(cfg, device, start)
    bounds = {"teacher": setup.evaluate(setup.teacher), "student": setup.evaluate(setup.student)}
    log(f"bounds: teacher {bounds['teacher']:.3f}, initial student {bounds['student']:.3f}", start)
    if cfg.setup_only:
        return {"bounds": bounds}
    if cfg.jobs > 1 and not (Path(cfg.cache) / "pair.pt").exists():
        setup.save(Path(cfg.cache) / "pair.pt")
    record = {
        "config": {k: v for k, v in vars(cfg).items()},
        "device": torch.cuda.get_device_name() if not on_cpu else "cpu",
        "torch": torch.__version__,
        "bounds": bounds,
        "teacher_history": setup.teacher_history,
        "student_history": setup.student_history,
        "setup_s": time.time() - start,
        "results": [],
        "skipped": [],
    }

    def write():
        (out / "quality.json").write_text(json.dumps(record, indent=1))

    def done(rule, seed, res):
        if res is None:
            record["skipped"].append({"rule": rule[0], "seed": seed})
            log(f"skip seed {seed} {rule[0]}: time budget spent", start)
            return
        record["results"].append(res)
        write()
        log(f"seed {seed} {res['rule']}: acc {res['accuracy']:.3f} share {res['kept_share']:.2f} "
            f"tokens {res['tokens_kept']:.0f} wall {res['wall_s']:.1f}s peak {res['peak_mem_mib']}", start)  # fmt: skip

    write()
    tasks = [(rule, seed) for seed in cfg.seeds for rule in rules]
    deadline = start + cfg.time_budget if cfg.time_budget else None
    if cfg.jobs == 1:
        run_times = []
        for rule, seed in tasks:
            if deadline is not None and run_times and time.time() + 1.1 * max(run_times) > deadline:
                done(rule, seed, None)
                continue
            t0 = time.time()
            random.seed(seed)
            done(rule, seed, distil(rule, setup, cfg, seed, out, on_cpu))
            run_times.append(time.time() - t0)
    else:
        # Runs start in seed-major order; a run not started by the deadline is skipped.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            cfg.jobs, mp_context=context, initializer=_worker_init, initargs=(cfg, on_cpu)
        ) as pool:
            futures = [(rule, seed, pool.submit(_worker_run, rule, seed, deadline)) for rule, seed in tasks]
            for rule, seed, future in futures:
                done(rule, seed, future.result())
        record["results"].sort(key=lambda r: (r["seed"], names.index(r["rule"])))
    record["total_s"] = time.time() - start
    write_outputs(record, names, out)
    return record


if __name__ == "__main__":
    main()
