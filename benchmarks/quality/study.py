"""The quality study of issue 16: do the TIP paper's selection rules keep up with all-token on-policy distillation?

Two tasks (`tasks.py`): three-digit addition with a one-path chain of thought (character tokens) and word problems
whose solutions branch (several valid orders, a byte-level BPE of about 1.2k tokens). For each task a teacher and
one student are trained here by plain next-token training; the student is saved twice, at the first held-out
evaluation at or above a weak target (~0.4) and at a strong one (~0.8), so a strength does not depend on the device's
speed. Each distillation run starts from one of them and distils it on-policy (`lmbda=1`) from the teacher with TRL's
`GKDTrainer` or with `TIPTrainer` and one selection rule; the score is greedy exact match and mean@k sampled accuracy
(temperature 1) of the final answer on held-out problems. Nothing is downloaded.

The flow (GPU commands in docs/quality.md):

    python study.py prepare --out runs/q/archive              # teacher + weak + strong students, one .tar
    python study.py run --archive runs/q/archive/quality_models.tar --out runs/q/sweep \
        --rules "TIP all" --lrs 1e-4 3e-4 1e-3 --seeds 0 1 2   # learning-rate sweep of all-token distillation
    python study.py run --archive ... --out runs/q/main --lr_from runs/q/sweep --seeds 0 1 2 3 4 5 6 7 8 9
    python study.py merge runs/q/sweep runs/q/main --out runs/q/all   # tables (markdown) and plots
    python study.py smoke --out /tmp/q                        # all of it in seconds on a CPU

`run` writes `quality.json` after every finished run (atomically), skips runs that would not finish within
`--time_budget`, records a failed run as an error instead of stopping, and prints little (one line per
`--print_every` runs, then a short summary), so a long GPU call loses nothing when it is cut short.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import io
import json
import math
import multiprocessing
import os
import random
import re
import statistics
import sys
import tarfile
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # the repository's trl_tip, also in spawned workers

import torch  # noqa: E402
from safetensors.torch import load as load_safetensors  # noqa: E402
from safetensors.torch import save as save_safetensors  # noqa: E402
from tasks import TASKS, TOKEN_CLASSES  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import PrinterCallback  # noqa: E402

from trl_tip import RandomTokens, SelectionCallback, TIPConfig, TIPTrainer, Union, build_selector  # noqa: E402
from trl_tip._compat import GKDConfig, GKDTrainer  # noqa: E402
from trl_tip.selection.registry import RULES as REGISTERED_RULES  # noqa: E402
from trl_tip.toy import make_model  # noqa: E402


ARCHIVE_NAME = "quality_models.tar"
STRENGTHS = ("weak", "strong")
SAMPLES = 4  # greedy completions of the distilled student kept per run
# The TIP paper's token shares at the start of training (Section 4), for the tables.
PAPER_SHARES = "Q4 40–47%, Q1+Q2 40–52%, Q3 3–15%"


# --------------------------------------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class Rule:
    """A row of the study.

    Attributes:
        name: Row label.
        trainer: `"gkd"` (TRL's `GKDTrainer`) or `"tip"` (`TIPTrainer`).
        selection: `token_selection` of `TIPConfig`.
        fields: Other `TIPConfig` fields. `"sstoken_warmup_steps": "20%"` is a share of the run's steps.
        mix_random: If set, the rule's selector is `Union(rule, RandomTokens(mix_random))` (a diagnostic).
        needs_rules: Registered rules that must exist for this row to mean what its name says (e.g. `tip` is the
            paper's Soft-OR only once the old `tip` rule was renamed `quadrant_budget`).
        group: `"main"` (the issue's rule list) or `"diagnostic"`.
    """

    name: str
    trainer: str
    selection: str | None = None
    fields: dict = field(default_factory=dict)
    mix_random: float | None = None
    needs_rules: tuple[str, ...] = ()
    group: str = "main"

    def __hash__(self):
        return hash(self.name)

    def config_fields(self, steps: int) -> dict:
        """The `TIPConfig` fields with shares of the run's steps resolved."""
        out = {}
        for key, value in self.fields.items():
            if isinstance(value, str) and value.endswith("%"):
                value = round(float(value[:-1]) / 100 * steps)
            out[key] = value
        return out

    def unavailable(self) -> str | None:
        """Why this row cannot run with the installed trl-tip, or `None` when it can."""
        if self.trainer == "gkd":
            return None
        names = [self.selection, *self.needs_rules]
        missing = [n for n in names if n not in REGISTERED_RULES]
        if missing:
            return f"needs the selection rule(s) {missing}, not registered in this trl-tip"
        known = {f.name for f in fields(TIPConfig)}  # plug-ins (ssToken) add their options to the config
        unknown = sorted(set(self.fields) - known)
        if unknown:
            return f"needs the TIPConfig option(s) {unknown}, not in this trl-tip"
        try:
            TIPConfig(output_dir=tempfile.gettempdir(), use_cpu=not torch.cuda.is_available(), bf16=False,
                      report_to="none", token_selection=self.selection, **self.config_fields(10))  # fmt: skip
        except (ValueError, TypeError) as exc:
            return f"TIPConfig refuses it: {exc}"
        return None


SOFT_OR = ("quadrant_budget",)  # `tip` is the paper's Soft-OR once the old `tip` rule is renamed `quadrant_budget`
SSTOKEN_PAPER = {"keep_ratio": 0.6, "sstoken_history": "fixed", "sstoken_warmup_steps": "20%"}

RULES = [
    Rule("GKD (all tokens)", "gkd"),
    Rule("TIP all", "tip", "all"),
    *(Rule(f"entropy {r}", "tip", "entropy_sample", {"keep_ratio": r}) for r in (0.5, 0.2, 0.1)),
    *(Rule(f"Soft-OR {r}", "tip", "tip", {"keep_ratio": r}, needs_rules=SOFT_OR) for r in (0.5, 0.2)),
    *(Rule(f"Q3 score {r}", "tip", "q3_score", {"keep_ratio": r}) for r in (0.1, 0.2)),
    Rule("divergence top-k 0.1", "tip", "divergence_topk", {"keep_ratio": 0.1}),
    Rule("Soft-OR bottom 0.5", "tip", "tip", {"keep_ratio": 0.5, "score_order": "lowest"}, needs_rules=SOFT_OR),
    *(Rule(f"random {r}", "tip", "random", {"keep_ratio": r}) for r in (0.5, 0.2, 0.1)),
    Rule("quadrants Q3", "tip", "quadrants", {"quadrants": ["Q3"]}),
    Rule("ssToken (paper)", "tip", "sstoken", SSTOKEN_PAPER),
    # Diagnostics: a rule that may collapse, mixed with 10% random tokens.
    Rule("quadrants Q3 + random 0.1", "tip", "quadrants", {"quadrants": ["Q3"]}, 0.1, group="diagnostic"),
    Rule("Q3 score 0.1 + random 0.1", "tip", "q3_score", {"keep_ratio": 0.1}, 0.1, group="diagnostic"),
    Rule("ssToken (paper) + random 0.1", "tip", "sstoken", SSTOKEN_PAPER, 0.1, group="diagnostic"),
]
ALL_TOKEN = ("GKD (all tokens)", "TIP all")
RULE_NAMES = [r.name for r in RULES]


def rule_table(extra: list[tuple[str, str, str]]) -> list[Rule]:
    """The built-in rules plus `--add_rule NAME SELECTION JSON` rows (JSON may hold `mix_random`)."""
    table = list(RULES)
    for name, selection, options in extra:
        opts = json.loads(options)
        if not isinstance(opts, dict):
            raise ValueError(f"--add_rule {name!r}: JSON must be an object of TIPConfig fields, got {options!r}")
        mix = opts.pop("mix_random", None)
        table.append(Rule(name, "tip", selection, opts, mix, group="added"))
    names = [r.name for r in table]
    if len(set(names)) != len(names):
        raise ValueError(f"--add_rule names must differ from each other and from the built-in rules {RULE_NAMES}")
    return table


# --------------------------------------------------------------------------------------------------- models and data


def quiet() -> None:
    """Silences the per-run warnings of transformers and TRL (hundreds of runs would flood a GPU call's output)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    for name in ("trl", "transformers", "trl_tip"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def log(msg: str, start: float) -> None:
    print(f"[{time.time() - start:6.0f}s] {msg}", flush=True)


def prompts_of(tokenizer, dataset) -> list[str]:
    return [
        tokenizer.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True) for r in dataset
    ]


def encode_sft(tokenizer, dataset, device):
    """Right-padded input ids and labels (-100 on prompt and padding) of the whole dataset, and each row's length."""
    ids, labels = [], []
    for row, prompt in zip(dataset, prompts_of(tokenizer, dataset), strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(tokenizer.apply_chat_template(row["messages"], tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
        ids.append(t)
        labels.append([-100] * len(p) + t[len(p) :])
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    x = torch.tensor([r + [pad] * (width - len(r)) for r in ids], device=device)
    y = torch.tensor([r + [-100] * (width - len(r)) for r in labels], device=device)
    return x, y, torch.tensor([len(r) for r in ids], device=device)


@torch.no_grad()
def evaluate(model, tokenizer, task, dataset, k: int = 0, seed: int = 0, rows: int = 1024, samples=None) -> dict:
    """Greedy exact match on `dataset` and, with `k > 0`, mean@k: the mean accuracy of `k` samples per problem at
    temperature 1 (top-k 0, top-p 1, as GKD samples its rollouts).

    Returns:
        `{"greedy": float, "mean_at_k": float | None, "k": k}`.
    """
    was_training = model.training
    model.eval()
    left = copy.copy(tokenizer)
    left.padding_side = "left"
    prompts, answers = prompts_of(tokenizer, dataset), list(dataset["answer"])

    def score(batch_prompts, batch_answers, sample):
        correct = 0
        for i in range(0, len(batch_prompts), rows):
            enc = left(batch_prompts[i : i + rows], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            kwargs = (
                {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
            )
            out = model.generate(**enc, max_new_tokens=task.max_new_tokens, **kwargs)
            texts = [task.decode(tokenizer, r) for r in out[:, enc["input_ids"].shape[1] :].tolist()]
            if samples is not None and not sample and len(samples) < SAMPLES:
                samples.extend(texts[: SAMPLES - len(samples)])
            correct += sum(task.is_correct(t, a) for t, a in zip(texts, batch_answers[i : i + rows], strict=True))
        return correct / len(batch_prompts)

    result = {"greedy": score(prompts, answers, False), "mean_at_k": None, "k": k}
    if k > 0:
        torch.manual_seed(seed)
        result["mean_at_k"] = score(
            [p for p in prompts for _ in range(k)], [a for a in answers for _ in range(k)], True
        )
    model.train(was_training)
    return result


def sft(
    model, data, pad, steps, batch_size, lr, seed, evaluate_fn, eval_every, targets, start, name, max_seconds=None
):
    """Plain next-token training; evaluates every `eval_every` steps and keeps a copy of the weights at the first
    evaluation at or above each of `targets` (a dict name -> accuracy); stops when all are reached, after `steps`
    steps, or at the first evaluation after `max_seconds` (a target not reached then gets the last weights, marked by
    their step and accuracy in the archive's meta).

    Returns:
        `(snapshots, history)`: `{name: (state_dict, step, accuracy)}` and the evaluation curve.
    """
    x, y, lengths = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    snapshots, history = {}, []
    pending = sorted(targets.items(), key=lambda kv: kv[1])
    t0 = time.time()
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(len(x), (batch_size,), generator=g).to(x.device)
        width = int(lengths[idx].max())
        xb, yb = x[idx, :width], y[idx, :width]
        loss = model(input_ids=xb, attention_mask=(xb != pad), labels=yb).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % eval_every == 0 or step == steps:
            acc = evaluate_fn(model)
            history.append({"step": step, "loss": round(loss.item(), 4), "acc": acc})
            reached = []
            while pending and acc >= pending[0][1]:
                label = pending.pop(0)[0]
                reached.append(label)
                snapshots[label] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, step, acc)
            if reached or len(history) % 10 == 0:  # a few lines, not one per evaluation
                saved = f" -> {', '.join(reached)}" if reached else ""
                log(f"{name} step {step} loss {loss.item():.3f} dev acc {acc:.3f}{saved}", start)
            if not pending:
                break
            if max_seconds is not None and time.time() - t0 > max_seconds:
                break
    for label, _ in pending:  # a target not reached: keep the last weights, marked as such
        log(f"{name}: target {label}={targets[label]} NOT reached by step {step} (dev acc {acc:.3f})", start)
        snapshots[label] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, step, acc)
    model.eval()
    return snapshots, history


def _state_bytes(state: dict) -> bytes:
    # float16 halves the archive; the bounds are measured after the round trip, on the weights every run loads.
    return save_safetensors({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in state.items()})


def _train_part(cfg, name: str, role: str) -> dict:
    """Trains the teacher (`role="teacher"`) or the student (`"student"`, snapshots at the weak and strong targets)
    of task `name`; returns the float16 weights and the training curve."""
    start = time.time()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 4))
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    task = TASKS[name]
    tokenizer = task.new_tokenizer()
    train, _, dev = task.splits(cfg.n_train, cfg.n_test, cfg.n_dev)
    data = encode_sft(tokenizer, train, device)
    log(f"{name} {role}: vocab {len(tokenizer)}, {len(train)} rows, width {data[0].shape[1]}, {device}", start)

    def dev_acc(model):
        return evaluate(model, tokenizer, task, dev, rows=cfg.eval_rows)["greedy"]

    if role == "teacher":
        model = make_model(tokenizer, *cfg.sizes[name]["teacher"], seed=1).to(device)
        snaps, history = sft(model, data, tokenizer.pad_token_id, cfg.teacher_steps, cfg.sft_batch, cfg.sft_lr, 1,
                             dev_acc, cfg.teacher_eval_every, {"teacher": cfg.teacher_target[name]}, start,
                             f"{name} teacher", cfg.max_seconds)  # fmt: skip
    else:
        model = make_model(tokenizer, *cfg.sizes[name]["student"], seed=2).to(device)
        targets = {"weak": cfg.weak_target, "strong": cfg.strong_target}
        snaps, history = sft(model, data, tokenizer.pad_token_id, cfg.student_steps, cfg.sft_batch, cfg.sft_lr, 2,
                             dev_acc, cfg.student_eval_every[name], targets, start, f"{name} student",
                             cfg.max_seconds)  # fmt: skip
    return {
        "weights": {label: _state_bytes(snap[0]) for label, snap in snaps.items()},
        "stopped": {label: {"step": snap[1], "dev_acc": snap[2]} for label, snap in snaps.items()},
        "history": history,
        "vocab": len(tokenizer),
        "tokenizer": tokenizer.backend_tokenizer.to_str() if name == "words" else None,
        "seconds": time.time() - start,
    }


def prepare(cfg) -> dict:
    """Trains a teacher and a weak and a strong student per task (each teacher and each student in its own process
    with `--jobs` > 1); writes them (float16), the tokenizer and the training curves into one tar, then loads it back
    and measures the bounds on the held-out test set."""
    start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = [(name, role) for name in cfg.tasks for role in ("teacher", "student")]
    if cfg.jobs > 1:
        context = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(min(cfg.jobs, len(parts)), mp_context=context) as pool:
            futures = {part: pool.submit(_train_part, cfg, *part) for part in parts}
            trained = {part: future.result() for part, future in futures.items()}
    else:
        trained = {part: _train_part(cfg, *part) for part in parts}
    members: dict[str, bytes] = {}
    for name in cfg.tasks:
        teacher, student = trained[name, "teacher"], trained[name, "student"]
        if teacher["tokenizer"] != student["tokenizer"] or teacher["vocab"] != student["vocab"]:
            raise RuntimeError(f"{name}: the teacher's and the student's processes built different tokenizers")
        meta = {
            "task": name,
            "vocab": teacher["vocab"],
            "sizes": {
                "teacher": list(cfg.sizes[name]["teacher"]),
                **{s: list(cfg.sizes[name]["student"]) for s in STRENGTHS},
            },  # fmt: skip
            "stopped": {**teacher["stopped"], **student["stopped"]},
            "targets": {"teacher": cfg.teacher_target[name], "weak": cfg.weak_target, "strong": cfg.strong_target},
            "teacher_history": teacher["history"],
            "student_history": student["history"],
            "train_seconds": {"teacher": teacher["seconds"], "student": student["seconds"]},
            "n_train": cfg.n_train,
            "n_test": cfg.n_test,
            "n_dev": cfg.n_dev,
        }
        members[f"{name}/teacher.safetensors"] = teacher["weights"]["teacher"]
        for label in STRENGTHS:
            members[f"{name}/{label}.safetensors"] = student["weights"][label]
        if teacher["tokenizer"] is not None:
            members[f"{name}/tokenizer.json"] = teacher["tokenizer"].encode()
        members[f"{name}/meta.json"] = json.dumps(meta).encode()
    path = out / ARCHIVE_NAME
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        for member, payload in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    os.replace(tmp, path)
    log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", start)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    archive = Archive(path, device)
    bounds = {}
    for name in cfg.tasks:
        setup = archive.setup(name, cfg.n_test)
        bounds[name] = {
            role: evaluate(model, setup.tokenizer, setup.task, setup.test, cfg.eval_k, seed=0, rows=cfg.eval_rows)
            for role, model in (("teacher", setup.teacher), *((s, setup.students[s]) for s in STRENGTHS))
        }
        stopped = archive.meta(name)["stopped"]
        text = ", ".join(
            f"{r} {v['greedy']:.3f} (mean@{v['k']} {v['mean_at_k']}, step {stopped[r]['step']})"
            for r, v in bounds[name].items()
        )
        log(f"{name} test: {text}", start)
    return {"archive": str(path), "bounds": bounds, "prepare_s": time.time() - start}


class TaskSetup:
    """What the runs of one task need: tokenizer, test set, frozen teacher and the two initial students."""

    def __init__(self, task, tokenizer, teacher, students, train, test, meta):
        self.task, self.tokenizer, self.teacher, self.students = task, tokenizer, teacher, students
        self.train, self.test, self.meta = train, test, meta


class Archive:
    """The tar `prepare` writes; builds each task's models (float32, on `device`) on first use."""

    def __init__(self, path, device):
        self.path, self.device = Path(path), torch.device(device)
        with tarfile.open(self.path) as tar:
            self.members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        self.tasks = sorted({name.split("/")[0] for name in self.members})
        self._setups: dict = {}

    def meta(self, name: str) -> dict:
        return json.loads(self.members[f"{name}/meta.json"])

    def setup(self, name: str, n_test: int) -> TaskSetup:
        if name not in self.tasks:
            raise ValueError(f"task {name!r} is not in {self.path} (it has {self.tasks}); run `prepare` for it")
        if (name, n_test) in self._setups:
            return self._setups[name, n_test]
        task, meta = TASKS[name], self.meta(name)
        if name == "words":
            from task_words import wrap_tokenizer

            tokenizer = wrap_tokenizer(Tokenizer.from_str(self.members[f"{name}/tokenizer.json"].decode()))
        else:
            tokenizer = task.new_tokenizer()
        if len(tokenizer) != meta["vocab"]:
            raise ValueError(f"{name}: tokenizer has {len(tokenizer)} tokens, the archived models {meta['vocab']}")
        if n_test > meta["n_test"]:
            raise ValueError(f"--n_test {n_test}: the {name} models were prepared with a test set of {meta['n_test']}")
        # The splits of `prepare` (the dev problems that decided when to stop stay out of every test set).
        train, test, _ = task.splits(meta["n_train"], meta["n_test"], meta["n_dev"])
        test = test.select(range(n_test))

        def model(role, seed):
            m = make_model(tokenizer, *meta["sizes"][role], seed=seed)
            state = load_safetensors(self.members[f"{name}/{role}.safetensors"])
            m.load_state_dict({k: v.float() for k, v in state.items()})
            return m.to(self.device).eval()

        teacher = model("teacher", 1)
        for p in teacher.parameters():
            p.requires_grad_(False)
        students = {s: model(s, 2) for s in STRENGTHS}
        self._setups[name, n_test] = TaskSetup(task, tokenizer, teacher, students, train, test, meta)
        return self._setups[name, n_test]


# --------------------------------------------------------------------------------------------------- diagnostics


class Diagnostics(SelectionCallback):
    """Observes every training micro-batch of a TIP run and records where the rule trains and on what.

    - kept share by completion position and by token class (`tasks.TaskSpec.token_classes`);
    - per logging window: mean teacher probability of the sampled token on kept and on dropped tokens, the share of
      rollouts that are "broken" (some sampled token the teacher gives less than `broken_prob`), and the share of
      all and of kept tokens that come after the first such token of their rollout (off the teacher's path);
    - the Q1–Q4 shares (the engine's split) and the signal quantiles of the first micro-batch, i.e. of the initial
      student's own rollouts before any update.
    """

    def __init__(self, task, tokenizer, window: int, broken_prob: float):
        self.task, self.tokenizer, self.window, self.broken_prob = task, tokenizer, window, broken_prob
        self.pos_total, self.pos_kept = Counter(), Counter()
        self.cls_total, self.cls_kept = Counter(), Counter()
        self.curve: list[dict] = []
        self._acc = None
        self.start: dict | None = None

    def on_selection(self, record, engine):
        if not record.training:
            return
        s = record.signals
        kept = (record.weights > 0).cpu()
        seq, pos = s.seq_idx.cpu(), s.pos_idx.cpu()
        labels = record.labels[:, 1:].cpu()
        first = (labels != -100).int().argmax(1)
        position = (pos - first[seq]).tolist()
        ids = record.input_ids[:, 1:].cpu()
        rows = defaultdict(list)
        for i, (q, p) in enumerate(zip(seq.tolist(), pos.tolist(), strict=True)):
            rows[q].append((p, i))
        classes = [""] * len(seq)
        for q, items in rows.items():
            items.sort()
            pieces = self.tokenizer.convert_ids_to_tokens([int(ids[q, p]) for p, _ in items])
            for (_, i), c in zip(items, self.task.token_classes(pieces), strict=True):
                classes[i] = c
        for p, c, k in zip(position, classes, kept.tolist(), strict=True):
            self.pos_total[p] += 1
            self.pos_kept[p] += int(k)
            self.cls_total[c] += 1
            self.cls_kept[c] += int(k)
        prob = s.teacher_log_prob.float().exp().cpu()
        finite = s.finite.cpu()
        low = finite & (prob < self.broken_prob)  # a token the teacher would hardly have written
        rows_n = int(seq.max()) + 1 if len(seq) else 0
        big = torch.iinfo(torch.long).max
        first_break = torch.full((rows_n,), big, dtype=torch.long).scatter_reduce(
            0, seq, torch.where(low, pos, torch.full_like(pos, big)), reduce="amin"
        )
        broken_rows = first_break < big
        after = pos > first_break[seq]  # strictly after the rollout's first such token: off the teacher's path
        acc = self._acc or {"kept_p": 0.0, "kept": 0, "drop_p": 0.0, "drop": 0, "rows": 0, "broken_rows": 0,
                            "tok": 0, "after": 0, "kept_after": 0, "step": record.global_step}  # fmt: skip
        acc["kept_p"] += float(prob[kept & finite].sum())
        acc["kept"] += int((kept & finite).sum())
        acc["drop_p"] += float(prob[~kept & finite].sum())
        acc["drop"] += int((~kept & finite).sum())
        acc["rows"] += rows_n
        acc["broken_rows"] += int(broken_rows.sum())
        acc["tok"] += len(seq)
        acc["after"] += int(after.sum())
        acc["kept_after"] += int((after & kept).sum())
        self._acc = acc
        if self.start is None:
            quadrant = record.quadrant.cpu()
            n = max(int(finite.sum()), 1)
            ent, div = s.entropy.float().cpu()[finite], s.divergence.float().cpu()[finite]
            self.start = {
                **{f"Q{q}": int(((quadrant == q) & finite).sum()) / n for q in range(1, 5)},
                "entropy_threshold": float(record.entropy_threshold),
                "divergence_threshold": float(record.divergence_threshold),
                "entropy_q": [round(float(v), 4) for v in torch.quantile(ent, torch.tensor([0.1, 0.5, 0.9]))],
                "divergence_q": [round(float(v), 4) for v in torch.quantile(div, torch.tensor([0.1, 0.5, 0.9]))],
                "tokens": n,
            }
        if record.global_step + 1 - acc["step"] >= self.window:
            self.flush()

    def flush(self):
        a = self._acc
        if not a:
            return
        self.curve.append(
            {
                "step": a["step"] + self.window,
                "teacher_p_kept": a["kept_p"] / a["kept"] if a["kept"] else None,
                "teacher_p_dropped": a["drop_p"] / a["drop"] if a["drop"] else None,
                "broken_rollouts": a["broken_rows"] / max(a["rows"], 1),
                "after_break_share_all": a["after"] / max(a["tok"], 1),
                "after_break_share_kept": a["kept_after"] / a["kept"] if a["kept"] else None,
            }
        )
        self._acc = None

    def result(self) -> dict:
        self.flush()

        def r(value):  # 4 decimals are plenty and keep the committed JSON small
            return None if value is None else round(value, 4)

        total = sum(self.cls_total.values())
        return {
            "kept_by_position": {p: r(self.pos_kept[p] / self.pos_total[p]) for p in sorted(self.pos_total)},
            "kept_by_class": {c: r(self.cls_kept[c] / self.cls_total[c]) for c in TOKEN_CLASSES if self.cls_total[c]},
            "class_share": {c: r(self.cls_total[c] / total) for c in TOKEN_CLASSES if self.cls_total[c]},
            "window_curve": [{k: (v if k == "step" else r(v)) for k, v in w.items()} for w in self.curve],
            "start_quadrants": self.start,
        }


class TokenCounter:
    """Counts, for `GKDTrainer`, the completion tokens its loss is computed on (all of them)."""

    def __init__(self):
        self.tokens = 0


def gkd_with_counter(counter: TokenCounter):
    class CountingGKDTrainer(GKDTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            counter.tokens += int((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

    return CountingGKDTrainer


# --------------------------------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Job:
    task: str
    student: str
    beta: float
    lr: float
    rule: Rule
    seed: int

    @property
    def key(self) -> tuple:
        return (self.task, self.student, self.beta, self.lr, self.rule.name, self.seed)

    def label(self) -> str:
        return f"{self.task}/{self.student}/b{self.beta:g}/lr{self.lr:g} {self.rule.name} s{self.seed}"


def distil(job: Job, setup: TaskSetup, cfg, on_cpu: bool) -> dict:
    """Distils a copy of the job's initial student with the job's rule and scores it."""
    rule, tokenizer = job.rule, setup.tokenizer
    student = copy.deepcopy(setup.students[job.student]).train()
    common = dict(
        output_dir=str(Path(tempfile.gettempdir()) / f"quality_study_{os.getpid()}"),
        seed=job.seed,
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch,
        learning_rate=job.lr,
        lr_scheduler_type=cfg.schedule,
        warmup_steps=0,
        lmbda=1.0,
        beta=job.beta,
        temperature=1.0,
        max_new_tokens=setup.task.max_new_tokens,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to="none",
        use_cpu=on_cpu,
        bf16=False,
        disable_tqdm=True,
    )
    counter, diagnostics, selector = TokenCounter(), None, None
    if rule.trainer == "gkd":
        args = GKDConfig(**common)
        trainer_cls = gkd_with_counter(counter)
        extra = {}
    else:
        args = TIPConfig(**common, token_selection=rule.selection, divergence=cfg.divergence,
                         **rule.config_fields(cfg.steps))  # fmt: skip
        if rule.mix_random:
            selector = Union(build_selector(args), RandomTokens(rule.mix_random))
        trainer_cls, extra = TIPTrainer, {"selector": selector}
    trainer = trainer_cls(model=student, teacher_model=setup.teacher, args=args, train_dataset=setup.train,
                          processing_class=tokenizer, **extra)  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    if rule.trainer == "tip":
        diagnostics = Diagnostics(setup.task, tokenizer, cfg.logging_steps, cfg.broken_prob)
        trainer.add_callback(diagnostics)
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
    windows = [e for e in logs if "loss" in e and "step" in e]
    if rule.trainer == "gkd":
        kept = eligible = counter.tokens
    else:
        step_logs = [e for e in logs if "tip/tokens_kept" in e]
        kept = sum(e["tip/tokens_kept"] * cfg.logging_steps for e in step_logs)
        eligible = sum(e["tip/tokens_eligible"] * cfg.logging_steps for e in step_logs)
    samples: list[str] = []
    scores = evaluate(trainer.model, tokenizer, setup.task, setup.test, cfg.eval_k, seed=10_000 + job.seed,
                      rows=cfg.eval_rows, samples=samples)  # fmt: skip
    result = {
        "task": job.task,
        "student": job.student,
        "beta": job.beta,
        "lr": job.lr,
        "rule": rule.name,
        "seed": job.seed,
        "accuracy": scores["greedy"],
        "mean_at_k": scores["mean_at_k"],
        "k": scores["k"],
        "tokens_kept": kept,
        "tokens_eligible": eligible,
        "kept_share": kept / eligible if eligible else None,
        "peak_mem_mib": peak,
        "wall_s": round(wall, 2),
        # The trainer's loss: on the kept tokens (TIP), on all tokens (GKD); one value per logging window.
        "loss_curve": [[e["step"], round(e["loss"], 5)] for e in windows],
        # Mean divergence of all eligible tokens (whether the rollouts as a whole get closer to the teacher).
        "divergence_curve": [[e["step"], round(e["tip/divergence"], 5)] for e in logs if "tip/divergence" in e],
        "samples": samples,
    }
    if diagnostics is not None:
        result.update(diagnostics.result())
    return result


# --------------------------------------------------------------------------------------------------- running many


_WORKER: dict = {}


def _worker_init(cfg, on_cpu) -> None:
    torch.set_num_threads(1)
    quiet()
    device = "cpu" if on_cpu else "cuda"
    _WORKER.update(cfg=cfg, on_cpu=on_cpu, archive=Archive(cfg.archive, device))


def _worker_run(job: Job) -> dict:
    cfg, archive = _WORKER["cfg"], _WORKER["archive"]
    try:
        setup = archive.setup(job.task, cfg.n_test)
        random.seed(job.seed)
        return distil(job, setup, cfg, _WORKER["on_cpu"])
    except Exception as exc:  # a failed run is recorded, the batch goes on
        tail = traceback.format_exc().strip().splitlines()[-3:]
        return {**dict(zip(("task", "student", "beta", "lr", "rule", "seed"), job.key, strict=True)),
                "error": f"{type(exc).__name__}: {exc}"[:500], "traceback": tail}  # fmt: skip


def write_json(path: Path, record: dict) -> None:
    """Writes `record` to `path` atomically (a reader, or a cut-off call, never sees half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=0))
    os.replace(tmp, path)


def choose_lrs(sweep_dirs: list[str]) -> dict:
    """The learning rate with the best mean greedy accuracy of all-token distillation (GKD and TIP `all` pooled),
    per (task, student, beta), from the `quality.json` of the sweep folders."""
    runs = [r for d in sweep_dirs for r in json.loads((Path(d) / "quality.json").read_text())["results"]]
    by = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["rule"] in ALL_TOKEN and "error" not in r:
            by[r["task"], r["student"], r["beta"]][r["lr"]].append(r["accuracy"])
    if not by:
        raise ValueError(f"--lr_from {sweep_dirs}: no all-token runs ({ALL_TOKEN}) to choose a learning rate from")
    return {key: max(lrs, key=lambda lr: (statistics.fmean(lrs[lr]), -lr)) for key, lrs in by.items()}


def finished_runs(dirs: list[str], config: dict) -> set[tuple]:
    """The keys of the runs in the `quality.json` of `dirs` (made with the same settings as `config`)."""
    keys = set()
    for d in dirs:
        if not (Path(d) / "quality.json").exists():  # e.g. an earlier call that had no time left for this stage
            print(f"--done: {d} has no quality.json; nothing to skip from it", flush=True)
            continue
        rec = json.loads((Path(d) / "quality.json").read_text())
        differ = [k for k in MERGE_KEYS if rec["config"].get(k) != config.get(k)]
        if differ:
            raise SystemExit(f"--done {d}: settings {differ} differ from this command's")
        keys |= {(r["task"], r["student"], r["beta"], r["lr"], r["rule"], r["seed"]) for r in rec["results"]}
    return keys


def run(cfg) -> dict:
    start = time.time()
    quiet()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    on_cpu = not torch.cuda.is_available() or cfg.cpu
    table = rule_table(cfg.add_rule)
    wanted = [r for r in table if r.name in cfg.rules] if cfg.rules else [r for r in table if r.group == "main"]
    rules, unavailable = [], {}
    for rule in wanted:
        reason = rule.unavailable()
        if reason is None:
            rules.append(rule)
        else:
            unavailable[rule.name] = reason
            print(f"SKIP rule {rule.name!r}: {reason}", flush=True)
    if unavailable and cfg.require_all_rules:
        raise SystemExit(f"--require_all_rules: {len(unavailable)} rule(s) cannot run here: {sorted(unavailable)}")
    lr_choice = choose_lrs(cfg.lr_from) if cfg.lr_from else None
    if lr_choice:
        print("lr from " + " ".join(cfg.lr_from) + ": " + ", ".join(
            f"{t}/{s}/b{b:g} {lr:g}" for (t, s, b), lr in sorted(lr_choice.items())), flush=True)  # fmt: skip
    jobs = []
    for seed in cfg.seeds:  # seed-major: a cut-off batch has every rule at fewer seeds, not some rules at none
        for name in cfg.tasks:
            for student in cfg.students:
                for beta in cfg.betas:
                    if lr_choice is not None:
                        if (name, student, beta) not in lr_choice:
                            raise SystemExit(f"--lr_from has no all-token runs for {name}/{student}/beta {beta}")
                        lrs = [lr_choice[name, student, beta]]
                    else:
                        lrs = cfg.lrs
                    jobs += [Job(name, student, beta, lr, rule, seed) for lr in lrs for rule in rules]
    done_keys = finished_runs(cfg.done, vars(cfg)) if cfg.done else set()
    if done_keys:
        before = len(jobs)
        jobs = [j for j in jobs if j.key not in done_keys]
        print(f"--done: {before - len(jobs)} of {before} runs already finished there, not rerun", flush=True)
    archive = Archive(cfg.archive, "cpu")
    missing = sorted(set(cfg.tasks) - set(archive.tasks))
    if missing:
        raise SystemExit(
            f"--archive {cfg.archive} has no models for {missing}; run `prepare --tasks {' '.join(missing)}`"
        )
    config = {k: v for k, v in vars(cfg).items() if k not in ("add_rule", "func")}
    record = {
        "config": config,
        "rules": {
            r.name: {"trainer": r.trainer, "selection": r.selection, "fields": r.fields, "mix_random": r.mix_random}
            for r in rules
        },  # fmt: skip
        "unavailable": unavailable,
        "lr_choice": {f"{t}/{s}/{b:g}": lr for (t, s, b), lr in (lr_choice or {}).items()},
        "archive_meta": {t: _meta_summary(archive.meta(t)) for t in cfg.tasks},
        "device": "cpu" if on_cpu else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "results": [],
        "errors": [],
        "skipped": [],
    }
    bounds_file = Path(cfg.archive).parent / "bounds.json"
    if bounds_file.exists():  # written by `prepare` beside the archive
        record["bounds"] = json.loads(bounds_file.read_text())["bounds"]
    path = out / "quality.json"
    write_json(path, record)
    log(f"{len(jobs)} runs on {record['device']}, {cfg.jobs} at a time; unavailable rules: {len(unavailable)}", start)
    deadline = start + cfg.time_budget if cfg.time_budget else None
    walls: list[float] = []
    print_every = cfg.print_every or max(1, len(jobs) // 40)
    finished = 0

    def done(job, res):
        nonlocal finished
        finished += 1
        if "error" in res:
            record["errors"].append(res)
            print(f"ERROR {job.label()}: {res['error'][:200]}", flush=True)
        else:
            record["results"].append(res)
        write_json(path, record)
        if finished % print_every == 0 or finished == len(jobs):
            log(f"{finished}/{len(jobs)} done, {len(record['errors'])} errors, last: {job.label()} "
                f"acc {res.get('accuracy', float('nan')):.3f}", start)  # fmt: skip

    def fits(now):
        if deadline is None:
            return True
        # Whole runs (set-up, training, evaluation); the first wave also paid for starting the workers.
        recent = walls[cfg.jobs :] or walls
        estimate = 1.2 * max(recent) if recent else cfg.run_estimate
        return now + estimate <= deadline

    pending = list(jobs)
    if cfg.jobs == 1:
        device = torch.device("cpu" if on_cpu else "cuda")
        local = Archive(cfg.archive, device)
        while pending:
            job = pending.pop(0)
            if not fits(time.time()):
                record["skipped"].append(list(job.key))
                continue
            _WORKER.update(cfg=cfg, on_cpu=on_cpu, archive=local)
            t0 = time.time()
            res = _worker_run(job)
            walls.append(time.time() - t0)
            done(job, res)
    else:
        context = multiprocessing.get_context("spawn")
        while pending:
            pool = cf.ProcessPoolExecutor(
                cfg.jobs, mp_context=context, initializer=_worker_init, initargs=(cfg, on_cpu)
            )
            running, submitted = {}, {}
            try:
                while pending or running:
                    while pending and len(running) < cfg.jobs:
                        job = pending.pop(0)
                        if not fits(time.time()):
                            record["skipped"].append(list(job.key))
                            continue
                        future = pool.submit(_worker_run, job)
                        running[future], submitted[future] = job, time.time()
                    if not running:
                        break
                    finished_now, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                    for future in finished_now:
                        job = running.pop(future)
                        walls.append(time.time() - submitted.pop(future))  # a worker was free at submission
                        done(job, future.result())
            except cf.process.BrokenProcessPool as exc:  # a worker died (e.g. out of memory): record and go on
                for future, job in running.items():
                    try:
                        res = future.result(timeout=0)
                    except Exception:
                        res = {**dict(zip(("task", "student", "beta", "lr", "rule", "seed"), job.key, strict=True)),
                               "error": f"worker died: {exc}"[:300]}  # fmt: skip
                    done(job, res)
                print(f"pool broken, restarting for the {len(pending)} runs left", flush=True)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    if record["skipped"]:
        log(f"{len(record['skipped'])} runs skipped: time budget", start)
    key_order = {j.key: i for i, j in enumerate(jobs)}
    record["results"].sort(
        key=lambda r: key_order[(r["task"], r["student"], r["beta"], r["lr"], r["rule"], r["seed"])]
    )
    record["total_s"] = time.time() - start
    write_json(path, record)
    print(short_summary(record["results"]), flush=True)
    if not cfg.json_only:
        write_reports(record, out)
    return record


def _meta_summary(meta: dict) -> dict:
    return {k: meta[k] for k in ("vocab", "sizes", "stopped", "targets", "n_train", "n_test", "n_dev")}


# --------------------------------------------------------------------------------------------------- tables, plots


def _group_key(r: dict) -> tuple:
    return (r["task"], r["student"], r["beta"])


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def _pm(values, fmt=".3f") -> str:
    mean, sd, n = _mean_sd(values)
    if mean is None:
        return "n/a"
    return format(mean, fmt) if sd is None else f"{format(mean, fmt)} ± {format(sd, fmt)}"


def _diff(values, reference, fmt=".3f") -> str:
    """Mean difference to the reference and its standard error (Welch: sqrt(s1²/n1 + s2²/n2))."""
    m1, s1, n1 = _mean_sd(values)
    m2, s2, n2 = _mean_sd(reference)
    if m1 is None or m2 is None:
        return "n/a"
    if s1 is None or s2 is None:
        return f"{m1 - m2:+{fmt}}"
    return f"{m1 - m2:+{fmt}} ± {math.sqrt(s1 * s1 / n1 + s2 * s2 / n2):{fmt}}"


def _rule_order(name: str) -> tuple:
    return (RULE_NAMES.index(name), "") if name in RULE_NAMES else (len(RULE_NAMES), name)


def group_tables(results: list[dict], bounds: dict | None = None) -> dict[tuple, str]:
    """One markdown table per (task, student, beta): accuracy (greedy and mean@k) as mean ± std over seeds, the
    difference to all-token distillation (GKD and TIP `all` pooled) ± its standard error, n, kept share, kept-token
    loss at the start and end, and the Q1–Q4 shares of the first batch."""
    groups = defaultdict(list)
    for r in results:
        groups[_group_key(r)].append(r)
    tables = {}
    for key, rows in groups.items():
        names = sorted(dict.fromkeys(r["rule"] for r in rows), key=_rule_order)
        reference = [r for r in rows if r["rule"] in ALL_TOKEN]
        k = next((r["k"] for r in rows if r.get("k")), 0)
        lrs = sorted({r["lr"] for r in rows})
        head = f"{key[0]}, {key[1]} student, beta {key[2]:g}, lr {', '.join(f'{lr:g}' for lr in lrs)}"
        if bounds and key[0] in bounds:
            b = bounds[key[0]]
            head += f"; teacher {b['teacher']['greedy']:.3f}, initial student {b[key[1]]['greedy']:.3f}"
            if b[key[1]].get("mean_at_k") is not None:
                head += f" (mean@{b[key[1]]['k']} {b[key[1]]['mean_at_k']:.3f})"
        lines = [
            head,
            "",
            f"| rule | lr | n | greedy | Δ greedy vs all-token | mean@{k} | Δ mean@{k} | kept share | "
            "kept-token loss first → last |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name in names:
            for lr in lrs:
                sel = [r for r in rows if r["rule"] == name and r["lr"] == lr]
                if not sel:
                    continue
                ref = [r for r in reference if r["lr"] == lr]
                first = [r["loss_curve"][0][1] for r in sel if r.get("loss_curve")]
                last = [r["loss_curve"][-1][1] for r in sel if r.get("loss_curve")]
                lines.append(
                    f"| {name} | {lr:g} | {len(sel)} | {_pm([r['accuracy'] for r in sel])} | "
                    f"{_diff([r['accuracy'] for r in sel], [r['accuracy'] for r in ref])} | "
                    f"{_pm([r['mean_at_k'] for r in sel])} | "
                    f"{_diff([r['mean_at_k'] for r in sel], [r['mean_at_k'] for r in ref])} | "
                    f"{_pm([r['kept_share'] for r in sel], '.2f')} | {_pm(first, '.3f')} → {_pm(last, '.3f')} |"
                )
        lines += diagnostics_table(rows, names, lrs)
        starts = [r["start_quadrants"] for r in rows if r.get("start_quadrants")]
        if starts:
            shares = {q: statistics.fmean(s[q] for s in starts) for q in ("Q1", "Q2", "Q3", "Q4")}
            lines += [
                "",
                f"Start (first batch of every TIP run, {len(starts)} runs, median split): "
                + ", ".join(f"{q} {100 * v:.1f}%" for q, v in shares.items())
                + f", Q1+Q2 {100 * (shares['Q1'] + shares['Q2']):.1f}% (with median splits Q1+Q2 and Q3+Q4 are 50% "
                f"by construction; Q4 near 50% means low entropy and low divergence go together). Paper: "
                f"{PAPER_SHARES}.",
            ]
        tables[key] = "\n".join(lines)
    return tables


def _window_mean(rows: list[dict], key: str, which: int | None = None) -> list[float]:
    """Per run, the mean of a `window_curve` field over the windows (or its value in window `which`)."""
    values = []
    for r in rows:
        curve = [w[key] for w in r.get("window_curve") or [] if w[key] is not None]
        if curve:
            values.append(curve[which] if which is not None else statistics.fmean(curve))
    return values


def diagnostics_table(rows: list[dict], names: list[str], lrs: list[float]) -> list[str]:
    """Where the kept set lies, per rule (TIP runs): the teacher's probability of the sampled token on kept and on
    dropped tokens, the share of broken rollouts (a token the teacher gives < `--broken_prob`) in the first and last
    logging window, and the share of the kept tokens and of all tokens that come after a rollout's first such token
    (a rule whose kept share there is far above the all-token share trains mostly on continuations of errors)."""
    lines = [
        "",
        "| rule | lr | teacher p kept | teacher p dropped | broken rollouts first → last | after the break: kept | "
        "all |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    count = 0
    for name in names:
        for lr in lrs:
            sel = [r for r in rows if r["rule"] == name and r["lr"] == lr and r.get("window_curve")]
            if not sel:
                continue
            count += 1
            lines.append(
                f"| {name} | {lr:g} | {_pm(_window_mean(sel, 'teacher_p_kept'))} | "
                f"{_pm(_window_mean(sel, 'teacher_p_dropped'))} | {_pm(_window_mean(sel, 'broken_rollouts', 0), '.2f')} "
                f"→ {_pm(_window_mean(sel, 'broken_rollouts', -1), '.2f')} | "
                f"{_pm(_window_mean(sel, 'after_break_share_kept'), '.2f')} | "
                f"{_pm(_window_mean(sel, 'after_break_share_all'), '.2f')} |"
            )
    return lines if count else []


def short_summary(results: list[dict]) -> str:
    """A compact text summary for a GPU call's stdout: one line per group and rule."""
    lines = []
    by = defaultdict(list)
    for r in results:
        by[_group_key(r) + (r["lr"], r["rule"])].append(r)
    for key, rows in by.items():
        acc = _mean_sd([r["accuracy"] for r in rows])
        mk = _mean_sd([r["mean_at_k"] for r in rows])
        sd = "" if acc[1] is None else f"±{acc[1]:.2f}"
        mk_text = "" if mk[0] is None else f" m@k {mk[0]:.3f}"
        lines.append(f"{key[0][:5]}/{key[1]}/b{key[2]:g}/lr{key[3]:g} {key[4][:24]:<24} n{len(rows)} "
                     f"{acc[0]:.3f}{sd}{mk_text}")  # fmt: skip
    return "\n".join(lines)


_MARKERS = "osD^v<>pP*Xh"


def _rule_style(name: str) -> dict:
    """Colour and marker of a rule, the same in every plot (matplotlib's default cycle repeats after 10 rules)."""
    import matplotlib

    i = RULE_NAMES.index(name) if name in RULE_NAMES else len(RULE_NAMES) + sum(map(ord, name))
    return {"color": matplotlib.colormaps["tab20"](i % 20), "marker": _MARKERS[i % len(_MARKERS)]}


def plot_groups(results: list[dict], bounds: dict | None, out: Path) -> list[Path]:
    """Per task and student: accuracy vs share of tokens kept (one marker per rule, error bars = standard error), a
    panel per beta; and the kept share by token class of each rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task, student in dict.fromkeys((r["task"], r["student"]) for r in results):
        rows = [r for r in results if r["task"] == task and r["student"] == student]
        betas = sorted({r["beta"] for r in rows}, reverse=True)
        fig, axes = plt.subplots(1, len(betas), figsize=(6.5 * len(betas), 4.8), squeeze=False)
        for ax, beta in zip(axes[0], betas, strict=True):
            sel = [r for r in rows if r["beta"] == beta]
            for name in sorted(dict.fromkeys(r["rule"] for r in sel), key=_rule_order):
                pts = [r for r in sel if r["rule"] == name]
                x = statistics.fmean(r["kept_share"] for r in pts)
                ys = [r["accuracy"] for r in pts]
                se = statistics.stdev(ys) / math.sqrt(len(ys)) if len(ys) > 1 else 0.0
                style = _rule_style(name)
                ax.errorbar(x, statistics.fmean(ys), yerr=se, fmt=style["marker"], color=style["color"], capsize=3,
                            label=name)  # fmt: skip
            if bounds and task in bounds:
                ax.axhline(bounds[task]["teacher"]["greedy"], color="gray", ls="--", lw=0.8, label="teacher")
                ax.axhline(bounds[task][student]["greedy"], color="gray", ls=":", lw=0.8, label="initial student")
            ax.set_xlabel("share of completion tokens trained on")
            ax.set_ylabel("greedy exact match (held-out)")
            ax.set_xscale("log")
            ax.set_title(f"{task}, {student} student, beta {beta:g} (mean ± SE over seeds)")
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        path = out / f"quality_{task}_{student}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
        paths.append(plot_dynamics(rows, task, student, out, plt))

        sel = [r for r in rows if r.get("kept_by_class")]
        names = sorted((n for n in dict.fromkeys(r["rule"] for r in sel) if n != "TIP all"), key=_rule_order)
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            pts = [r["kept_by_class"] for r in sel if r["rule"] == name]
            vals = [statistics.fmean(p.get(c, 0.0) for p in pts) for c in TOKEN_CLASSES]
            ax.bar([j + i * width for j in range(len(TOKEN_CLASSES))], vals, width, label=name,
                   color=_rule_style(name)["color"])  # fmt: skip
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(TOKEN_CLASSES))])
        ax.set_xticklabels(TOKEN_CLASSES)
        ax.set_ylabel("share of the class's tokens kept")
        ax.set_title(f"Where each rule trains: {task}, {student} student (all betas, mean over seeds)")
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        path = out / f"quality_{task}_{student}_classes.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return [p for p in paths if p is not None]


def plot_dynamics(rows: list[dict], task: str, student: str, out: Path, plt) -> Path | None:
    """Per rule (mean over seeds, highest beta): the loss on the kept tokens, the share of broken rollouts and the
    teacher's probability of the kept tokens, over training."""
    beta = max(r["beta"] for r in rows)
    sel = [r for r in rows if r["beta"] == beta and r.get("window_curve")]
    if not sel:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for name in sorted(dict.fromkeys(r["rule"] for r in sel), key=_rule_order):
        pts = [r for r in sel if r["rule"] == name]
        n = min(len(r["loss_curve"]) for r in pts)
        steps = [s for s, _ in pts[0]["loss_curve"][:n]]
        axes[0].plot(steps, [statistics.fmean(r["loss_curve"][i][1] for r in pts) for i in range(n)],
                     marker=_rule_style(name)["marker"], markersize=4, color=_rule_style(name)["color"],
                     label=name)  # fmt: skip
        for ax, key in ((axes[1], "broken_rollouts"), (axes[2], "teacher_p_kept")):
            n = min(len(r["window_curve"]) for r in pts)
            windows = [w["step"] for w in pts[0]["window_curve"][:n]]
            means = []
            for i in range(n):
                values = [r["window_curve"][i][key] for r in pts if r["window_curve"][i][key] is not None]
                means.append(statistics.fmean(values) if values else float("nan"))
            ax.plot(windows, means, marker=_rule_style(name)["marker"], markersize=4, color=_rule_style(name)["color"],
                    label=name)  # fmt: skip
    for ax, title in zip(axes, ("loss on the kept tokens", "share of broken rollouts", "teacher p of kept tokens"),
                         strict=True):  # fmt: skip
        ax.set_xlabel("step")
        ax.set_title(f"{title} ({task}, {student}, beta {beta:g})", fontsize=9)
    axes[0].set_yscale("log")
    axes[2].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    path = out / f"quality_{task}_{student}_dynamics.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(record: dict, out: Path, plots: bool = True) -> None:
    """`quality.md` (every group's table) and the plots, from the runs of `record`."""
    bounds = record.get("bounds")
    tables = group_tables(record["results"], bounds)
    text = "\n\n".join(tables[k] for k in sorted(tables, key=lambda k: (k[0], k[1], -k[2])))
    if record.get("unavailable"):
        text += "\n\nRules not run (not in this trl-tip): " + "; ".join(
            f"{n}: {why}" for n, why in record["unavailable"].items()
        )
    (out / "quality.md").write_text(text + "\n")
    if plots and record["results"]:
        plot_groups(record["results"], bounds, out)


# Settings that must agree for runs to be merged into one table.
MERGE_KEYS = ("steps", "batch", "schedule", "divergence", "n_test", "eval_k", "broken_prob", "logging_steps")


def merge(cfg) -> dict:
    """Joins the runs of several `run` folders (same archive and settings) and writes the tables and plots."""
    records = [json.loads((Path(d) / "quality.json").read_text()) for d in cfg.dirs]
    first = records[0]
    for d, rec in zip(cfg.dirs[1:], records[1:], strict=True):
        differ = [k for k in MERGE_KEYS if rec["config"].get(k) != first["config"].get(k)]
        if differ:
            raise ValueError(f"{d}: settings {differ} differ from {cfg.dirs[0]}")
        for task in set(rec["archive_meta"]) & set(first["archive_meta"]):
            if rec["archive_meta"][task] != first["archive_meta"][task]:
                raise ValueError(f"{d}: the {task} models differ from those of {cfg.dirs[0]} (another archive)")
    seen, results = set(), []
    for d, rec in zip(cfg.dirs, records, strict=True):
        for r in rec["results"]:
            key = (r["task"], r["student"], r["beta"], r["lr"], r["rule"], r["seed"])
            if key in seen:
                raise ValueError(f"{d}: run {key} is already in an earlier folder")
            seen.add(key)
            results.append(r)
    bounds = next((rec["bounds"] for rec in records if rec.get("bounds")), None)
    if cfg.bounds:
        bounds = json.loads(Path(cfg.bounds).read_text())["bounds"]
    record = {
        "merged_from": list(cfg.dirs),
        "config": first["config"],
        "archive_meta": {t: m for rec in records for t, m in rec["archive_meta"].items()},
        "unavailable": {n: w for rec in records for n, w in rec.get("unavailable", {}).items()},
        "bounds": bounds,
        "results": results,
        "errors": [e for rec in records for e in rec.get("errors", [])],
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "quality.json", record)
    write_reports(record, out, plots=not cfg.no_plots)
    if not cfg.quiet:
        print((out / "quality.md").read_text(), flush=True)
    return record


DOC_MARKER = re.compile(r"<!-- study-tables: (.+?) -->")


def check_doc(doc: Path, root: Path | None = None) -> tuple[int, list[str]]:
    """Rebuilds the tables a doc quotes and lists the rows it does not contain.

    Each `<!-- study-tables: DIR [DIR ...] [--bounds FILE] -->` marker in the doc names the committed `run` folders
    (relative to `root`, the repository) that `merge` joins; every table row of the result must appear in the doc,
    character for character.

    Returns:
        `(markers, missing)`: the number of markers and the rows not found.
    """
    root = root or doc.resolve().parents[1]
    text = doc.read_text()
    markers = DOC_MARKER.findall(text)
    missing = []
    for marker in markers:
        words = marker.split()
        bounds = None
        if "--bounds" in words:
            i = words.index("--bounds")
            bounds, words = words[i + 1], words[:i] + words[i + 2 :]
        with tempfile.TemporaryDirectory() as tmp:
            argv = ["merge", *(str(root / w) for w in words), "--out", tmp, "--no_plots", "--quiet"]
            record = main(argv + (["--bounds", str(root / bounds)] if bounds else []))
        for table in group_tables(record["results"], record.get("bounds")).values():
            missing += [line for line in table.splitlines() if line.startswith("| ") and line not in text]
    return len(markers), missing


# --------------------------------------------------------------------------------------------------- command line


def _size(text: str) -> tuple[int, int]:
    hidden, _, layers = text.partition("x")
    return int(hidden), int(layers)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare", help="train teacher, weak and strong students; write one archive")
    prep.add_argument("--out", required=True, help=f"folder for {ARCHIVE_NAME} and bounds.json")
    prep.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    prep.add_argument("--n_train", type=int, default=20000)
    prep.add_argument("--n_test", type=int, default=500)
    prep.add_argument("--n_dev", type=int, default=300, help="held-out problems that decide when to stop training")
    prep.add_argument("--teacher_size", action="append", default=[], metavar="TASK=HxL", help="e.g. words=256x4")
    prep.add_argument("--student_size", action="append", default=[], metavar="TASK=HxL")
    prep.add_argument(
        "--teacher_target", type=float, default=None, help="default: the task's (0.99 addition, 0.95 words)"
    )
    prep.add_argument("--weak_target", type=float, default=0.4)
    prep.add_argument("--strong_target", type=float, default=0.8)
    prep.add_argument("--teacher_steps", type=int, default=5000, help="at most")
    prep.add_argument("--student_steps", type=int, default=6000, help="at most")
    prep.add_argument("--teacher_eval_every", type=int, default=100)
    prep.add_argument(
        "--student_eval_every", type=int, default=None, help="default: the task's (5 addition, 25 words)"
    )
    prep.add_argument("--sft_batch", type=int, default=128)
    prep.add_argument("--sft_lr", type=float, default=1e-3)
    prep.add_argument("--eval_k", type=int, default=16)
    prep.add_argument("--eval_rows", type=int, default=4096, help="generation batch (rows) of evaluations")
    prep.add_argument("--jobs", type=int, default=1, help="train teachers and students in parallel processes")
    prep.add_argument("--max_seconds", type=float, default=None, help="stop each training after this long")
    prep.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")

    r = sub.add_parser("run", help="distil (sweeps too: several --lrs)")
    r.add_argument("--archive", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--tasks", nargs="+", default=["words"], choices=list(TASKS))
    r.add_argument("--students", nargs="+", default=list(STRENGTHS), choices=list(STRENGTHS))
    r.add_argument("--betas", type=float, nargs="+", default=[1.0], help="1 = reverse KL (the paper's loss)")
    lr = r.add_mutually_exclusive_group()
    lr.add_argument("--lrs", type=float, nargs="+", default=[3e-4])
    lr.add_argument("--lr_from", nargs="+", metavar="DIR", help="the best all-token lr of these sweep folders")
    r.add_argument("--rules", nargs="+", default=None, help="row names (default: every main rule)")
    r.add_argument("--add_rule", nargs=3, action="append", default=[], metavar=("NAME", "SELECTION", "JSON"))
    r.add_argument("--require_all_rules", action="store_true", help="stop if a wanted rule is not in this trl-tip")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--steps", type=int, default=60)
    r.add_argument("--batch", type=int, default=64, help="prompts (one rollout each) per step")
    r.add_argument("--schedule", default="cosine", choices=["cosine", "constant", "linear"])
    r.add_argument("--divergence", default="reverse_kl", choices=["reverse_kl", "forward_kl", "jsd"],
                   help="the divergence axis of the signals (the paper's δ is reverse KL)")  # fmt: skip
    r.add_argument("--logging_steps", type=int, default=5)
    r.add_argument("--n_test", type=int, default=500)
    r.add_argument("--eval_k", type=int, default=16, help="samples per problem of mean@k (0: greedy only)")
    r.add_argument("--eval_rows", type=int, default=4096)
    r.add_argument("--broken_prob", type=float, default=0.05, help="a rollout with a token below this is 'broken'")
    r.add_argument("--done", nargs="+", metavar="DIR", help="skip the runs already in these folders (resume)")
    r.add_argument("--jobs", type=int, default=1)
    r.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    r.add_argument("--time_budget", type=float, default=None, help="seconds; runs that would not fit are skipped")
    r.add_argument("--run_estimate", type=float, default=90.0, help="seconds a run takes until one has finished")
    r.add_argument("--print_every", type=int, default=0, help="progress line every N runs (0: about 40 lines)")
    r.add_argument("--json_only", action="store_true", help="write only quality.json (no markdown, no plots)")

    m = sub.add_parser("merge", help="tables and plots from several run folders")
    m.add_argument("dirs", nargs="+")
    m.add_argument("--out", required=True)
    m.add_argument("--bounds", default=None, help="bounds.json of `prepare` (teacher and students' accuracy)")
    m.add_argument("--no_plots", action="store_true")
    m.add_argument("--quiet", action="store_true", help="do not print the tables")

    c = sub.add_parser("check-doc", help="check that a doc quotes the tables of its study-tables markers")
    c.add_argument("doc")

    s = sub.add_parser("smoke", help="everything with tiny settings on the CPU, in seconds")
    s.add_argument("--out", required=True)
    s.add_argument("--rules", nargs="+", default=None)

    cfg = p.parse_args(argv)
    if cfg.command == "prepare":
        cfg.sizes = {t: {"teacher": TASKS[t].teacher_size, "student": TASKS[t].student_size} for t in TASKS}
        for option, role in ((cfg.teacher_size, "teacher"), (cfg.student_size, "student")):
            for item in option:
                task, _, size = item.partition("=")
                if task not in TASKS:
                    p.error(f"--{role}_size {item!r}: task must be one of {list(TASKS)}")
                try:
                    cfg.sizes[task][role] = _size(size)
                except ValueError:
                    p.error(f"--{role}_size {item!r}: size must be HIDDENxLAYERS, e.g. 256x4")
        given_target, given_every = cfg.teacher_target, cfg.student_eval_every
        cfg.teacher_target = {t: TASKS[t].teacher_target if given_target is None else given_target for t in TASKS}
        cfg.student_eval_every = {t: given_every or TASKS[t].student_eval_every for t in TASKS}
        if not cfg.weak_target < cfg.strong_target:
            p.error(f"--weak_target ({cfg.weak_target}) must be below --strong_target ({cfg.strong_target})")
    if cfg.command == "run":
        if cfg.steps % cfg.logging_steps:
            p.error("--steps must be a multiple of --logging_steps (token counts are summed per logging window)")
        if cfg.jobs < 1:
            p.error(f"--jobs must be at least 1, got {cfg.jobs}")
        try:
            table = rule_table(cfg.add_rule)
        except (ValueError, json.JSONDecodeError) as exc:
            p.error(str(exc))
        names = [rule.name for rule in table]
        unknown = [n for n in cfg.rules or [] if n not in names]
        if unknown:
            p.error(f"--rules {unknown} unknown; allowed: {names}")
    return cfg


def smoke(cfg) -> dict:
    """prepare → sweep → run (lr from the sweep) → merge, with tiny models and data, on the CPU."""
    out = Path(cfg.out)
    tiny = ["--n_train", "200", "--n_test", "8", "--n_dev", "8", "--teacher_steps", "4", "--student_steps", "4",
            "--teacher_eval_every", "2", "--student_eval_every", "2", "--sft_batch", "8", "--eval_k", "2",
            "--teacher_size", "addition=32x1", "--teacher_size", "words=32x1", "--student_size", "addition=32x1",
            "--student_size", "words=32x1", "--weak_target", "0.0", "--strong_target", "0.01"]  # fmt: skip
    main(["prepare", "--out", str(out / "archive"), *tiny])
    archive = str(out / "archive" / ARCHIVE_NAME)
    run_args = ["--archive", archive, "--tasks", "words", "--n_test", "8", "--eval_k", "2", "--steps", "2",
                "--batch", "4", "--logging_steps", "1", "--cpu"]  # fmt: skip
    # The sweep has its own seeds, so the lr is not chosen on the seeds it is then compared on.
    main(["run", *run_args, "--out", str(out / "sweep"), "--rules", "TIP all", "--lrs", "1e-4", "1e-3",
          "--students", "weak", "--seeds", "100"])  # fmt: skip
    rules = cfg.rules or ["GKD (all tokens)", "TIP all", "entropy 0.5", "quadrants Q3", "ssToken (paper)"]
    main(["run", *run_args, "--out", str(out / "main"), "--rules", *rules, "--lr_from", str(out / "sweep"),
          "--students", "weak", "--seeds", "0"])  # fmt: skip
    return main(["merge", str(out / "sweep"), str(out / "main"), "--out", str(out / "merged"), "--bounds",
                 str(out / "archive" / "bounds.json")])  # fmt: skip


def main(argv=None):
    cfg = parse(argv)
    if cfg.command == "prepare":
        result = prepare(cfg)
        write_json(Path(cfg.out) / "bounds.json", result)
        return result
    if cfg.command == "run":
        return run(cfg)
    if cfg.command == "merge":
        return merge(cfg)
    if cfg.command == "check-doc":
        markers, missing = check_doc(Path(cfg.doc))
        print(f"{markers} study-tables markers, {len(missing)} table rows missing from {cfg.doc}")
        for line in missing:
            print(line)
        if missing:
            raise SystemExit(1)
        return {"markers": markers, "missing": missing}
    return smoke(cfg)


if __name__ == "__main__":
    main()
