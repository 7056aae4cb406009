"""Peak GPU memory and step time of `TIPTrainer`'s selection rules against TRL's `GKDTrainer`.

One process, one device. For every rule it builds the trainer around the same student and teacher (random weights,
restored to the same initial values for each rule), then times the training step exactly as `Trainer.train` runs it
(`training_step`: forward, loss, backward; then the optimizer step) on a fixed batch of random token ids whose first
`--prompt` tokens are prompt (labels -100):

* without generation: `lmbda=0`, `seq_kd=False`, so the batch is trained on as it is;
* with generation (`--generation`): `lmbda=1`, the student samples `--max-new-tokens` tokens after the prompt at
  every step (GKD inside `training_step`, TIPTrainer in `get_batch_samples`), and the step trains on
  prompt + sampled completion.

It reports the peak of `torch.cuda.max_memory_allocated` over the timed steps (weights, gradients and optimizer
state included), the median step time over `--steps` steps after `--warmup` steps, the completion tokens trained per
second, the ratios to `GKDTrainer`, and, for TIPTrainer, the median time of the selection overhead (signals,
thresholds and selection, timed with CUDA events inside the step) as a share of the step. It prints a markdown table
last and can write every number as JSON (`--json`).

    python benchmarks/memory_speed.py                      # 4x2048, every rule, no generation
    python benchmarks/memory_speed.py --shapes 8x4096      # the large case
    python benchmarks/memory_speed.py --generation --max-new-tokens 128
    python benchmarks/memory_speed.py --tiny               # seconds on a CPU: a smoke test of the harness

Rules are given as `name[:value]`: `gkd` (TRL's GKDTrainer), `all`, `entropy_topk:0.5`, `entropy_sample:0.5`,
`quadrants:Q3`, `tip:0.2`, `sstoken:0.6`, ... (the value is `keep_ratio`, or the quadrants for `quadrants`). A rule
the installed trl_tip does not know is skipped with a printed note.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import trl_tip  # noqa: E402
import trl_tip.engine as tip_engine_module  # noqa: E402
from trl_tip import TIPConfig, TIPTrainer  # noqa: E402
from trl_tip._compat import GKDConfig, GKDTrainer  # noqa: E402
from trl_tip.selection import TOKEN_SELECTIONS  # noqa: E402


DEFAULT_RULES = "gkd,all,entropy_topk:0.5,entropy_sample:0.5,quadrants:Q3,tip:0.2,sstoken:0.6"
GIB = 2**30

# Qwen2.5-0.5B and Qwen2.5-1.5B shapes (config.json of the released models), random weights.
QWEN_SHAPES = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12),
}
TINY_SHAPES = {
    "0.5B": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "1.5B": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}


@dataclass
class Rule:
    """One row of the benchmark: TRL's GKDTrainer or a TIPTrainer selection rule."""

    name: str
    label: str
    config: dict = field(default_factory=dict)

    @property
    def is_gkd(self) -> bool:
        return self.name == "gkd"


@dataclass
class Result:
    rule: str
    shape: str
    generation: bool
    status: str = "ok"
    peak_gib: float = float("nan")
    static_gib: float = float("nan")
    step_s: float = float("nan")
    step_times: list = field(default_factory=list)
    tokens_per_step: float = float("nan")
    tokens_per_s: float = float("nan")
    selection_s: float = float("nan")
    kept_frac: float = float("nan")
    note: str = ""


def parse_rules(spec: str) -> list[Rule]:
    """Parses `gkd,all,entropy_topk:0.5,quadrants:Q3+Q1,...` into rules; unknown TIP rules are dropped with a note."""
    rules = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        name, _, value = item.partition(":")
        if name == "gkd":
            rules.append(Rule("gkd", "GKDTrainer (all tokens)"))
            continue
        if name not in TOKEN_SELECTIONS:
            print(
                f"note: token_selection={name!r} is not known to the installed trl_tip "
                f"({trl_tip.__file__}; it knows {', '.join(TOKEN_SELECTIONS)}): skipping {item!r}.",
                flush=True,
            )
            continue
        config = {"token_selection": name}
        if name == "quadrants":
            config["quadrants"] = (value or "Q3").split("+")
            label = f"TIP quadrants {'+'.join(config['quadrants'])}"
        elif value:
            config["keep_ratio"] = float(value)
            label = f"TIP {name} {float(value):.0%}"
        else:
            label = f"TIP {name}"
        rules.append(Rule(name, label, config))
    return rules


def parse_shape(spec: str) -> tuple[int, int]:
    b, _, t = spec.lower().partition("x")
    return int(b), int(t)


def make_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose ids cover `vocab_size`; only its pad/eos ids are used (the batch is random ids)."""
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def make_model(size: str, vocab_size: int, tiny: bool, device: torch.device, dtype: torch.dtype, seed: int):
    shape = (TINY_SHAPES if tiny else QWEN_SHAPES)[size]
    config = Qwen2Config(
        vocab_size=vocab_size,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
        use_cache=False,
        **shape,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    # Random ids never meet an end-of-sequence token: every sampled completion is `max_new_tokens` long.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def make_batch(batch: int, seq: int, prompt: int, vocab: int, device: torch.device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (batch, seq), generator=g)
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": labels.to(device),
        "prompts": input_ids[:, :prompt].to(device),
        "prompt_attention_mask": torch.ones(batch, prompt, dtype=torch.long, device=device),
    }


class SelectionTimer:
    """Times `compute_token_signals` and `TokenSelectionEngine.select` inside the step (CUDA events, no extra sync)."""

    def __init__(self, trainer, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple] = []
        self._patched = []
        for owner, name in ((tip_engine_module, "compute_token_signals"), (trainer.tip_engine, "select")):
            original = getattr(owner, name)
            setattr(owner, name, self._wrap(original))
            self._patched.append((owner, name, original, owner is trainer.tip_engine))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
            else:
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                end = time.perf_counter()
            self.spans.append((start, end))
            return out

        return timed

    def take(self) -> float:
        """Seconds spent in the wrapped calls since the last `take` (call after a synchronize)."""
        total = 0.0
        for start, end in self.spans:
            total += start.elapsed_time(end) / 1000 if self.cuda else end - start
        self.spans.clear()
        return total

    def restore(self) -> None:
        for owner, name, original, is_instance in self._patched:
            if is_instance:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def build_trainer(rule: Rule, student, teacher, tokenizer, ns, batch_size: int, output_dir: str):
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-5,
        lmbda=1.0 if ns.generation else 0.0,
        seq_kd=False,
        beta=0.5,
        temperature=1.0,
        max_new_tokens=ns.max_new_tokens,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=ns.seed,
        max_length=None,
        # "bf16": bf16 weights trained in bf16 (no autocast); "amp": bf16=True, accelerate's autocast, whose forward
        # returns float32 outputs (GKD's full logits then take twice the memory).
        **({"use_cpu": True, "bf16": False} if ns.device == "cpu" else {"bf16": ns.precision == "amp"}),
    )
    dataset = Dataset.from_dict({"messages": [[{"role": "user", "content": "x"}]] * batch_size})
    if rule.is_gkd:
        args = GKDConfig(**common)
        cls, extra = GKDTrainer, {}
    else:
        args = TIPConfig(**common, **rule.config, **({"tip_chunk_size": ns.chunk_size} if ns.chunk_size else {}))
        cls, extra = TIPTrainer, {}
    trainer = cls(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=lambda rows: rows,
        **extra,
    )
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.config.use_cache = False
    trainer.create_optimizer()
    model, optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.model_wrapped, trainer.optimizer = model, optimizer
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def one_step(trainer, rule: Rule, batch: dict) -> int:
    """One optimizer step as `Trainer.train` runs it; returns the completion tokens trained on."""
    inputs = {k: v.clone() for k, v in batch.items()}
    if rule.is_gkd:
        count = (inputs["labels"][:, 1:] != -100).sum()
        if trainer.lmbda > 0:
            # GKD counts the dataset's labels before it generates; with a prompt-only batch that count is 0, so
            # give the number of tokens it will sample (random weights never sample an end of sequence).
            count = torch.tensor(inputs["input_ids"].size(0) * trainer.args.max_new_tokens)
        trainer.training_step(trainer.model_wrapped, inputs, count)
        trained = inputs["labels"]  # GKD replaces the dict's tensors in place when it generates
    else:
        samples, count = trainer.get_batch_samples(iter([inputs]), 1, trainer.accelerator.device)
        trained = samples[0]["labels"]
        trainer.training_step(trainer.model_wrapped, samples[0], count)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return int((trained[:, 1:] != -100).sum())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(rule: Rule, shape: str, student, teacher, init_state, tokenizer, ns, device) -> Result:
    b, t = parse_shape(shape)
    if ns.generation:
        seq = ns.prompt  # the batch holds the prompt; the completion is sampled
        shape = f"{b}x({ns.prompt}+{ns.max_new_tokens})"
    else:
        seq = t
    result = Result(rule.label, shape, ns.generation)
    batch = make_batch(b, seq, ns.prompt, ns.vocab, device, ns.seed)
    trainer = timer = None
    oom = False
    try:
        with torch.no_grad():
            for name, p in student.named_parameters():
                p.copy_(init_state[name])
        with tempfile.TemporaryDirectory() as output_dir:
            trainer = build_trainer(rule, student, teacher, tokenizer, ns, b, output_dir)
            timer = None if rule.is_gkd else SelectionTimer(trainer, device)
            for _ in range(ns.warmup):
                one_step(trainer, rule, batch)
            sync(device)
            if timer:
                timer.take()
            if device.type == "cuda":
                gc.collect()
                torch.cuda.reset_peak_memory_stats(device)
                result.static_gib = torch.cuda.memory_allocated(device) / GIB
            times, selection, tokens = [], [], []
            for _ in range(ns.steps):
                sync(device)
                start = time.perf_counter()
                tokens.append(one_step(trainer, rule, batch))
                sync(device)
                times.append(time.perf_counter() - start)
                if timer:
                    selection.append(timer.take())
            if device.type == "cuda":
                result.peak_gib = torch.cuda.max_memory_allocated(device) / GIB
            result.step_times = times
            result.step_s = statistics.median(times)
            result.tokens_per_step = statistics.mean(tokens)
            result.tokens_per_s = result.tokens_per_step / result.step_s
            if selection:
                result.selection_s = statistics.median(selection)
            if not rule.is_gkd:
                stats = trainer.tip_statistics
                with contextlib.suppress(Exception):
                    result.kept_frac = float(stats.compute(None, num_steps=1).get("tip/kept_frac", float("nan")))
            if ns.profile and device.type == "cuda" and rule.label in ns.profile_rules:
                profile_step(trainer, rule, batch, shape, ns)
    except torch.OutOfMemoryError as exc:  # keep going: the next rule may fit
        oom = True
        result.status = "OOM"
        result.note = str(exc).split("\n")[0][:200]
    finally:
        if timer:
            timer.restore()
        if trainer is not None:
            trainer.accelerator.free_memory()
        del trainer, timer, batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if oom:
        print(f"  {rule.label} {shape}: out of memory: {result.note}", flush=True)
    return result


def profile_step(trainer, rule, batch, shape, ns) -> None:
    """One step under torch.profiler; writes the kernel table (and a memory snapshot) to --profile-dir."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(ns.profile_dir, exist_ok=True)
    tag = f"{rule.name}_{shape}".replace(" ", "_")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=False) as prof:
        one_step(trainer, rule, batch)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    with open(os.path.join(ns.profile_dir, f"profile_{tag}.txt"), "w") as fh:
        fh.write(table)
    print(f"--- profile {rule.label} {shape} ---\n{table[:6000]}", flush=True)


def fmt(x: float, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(results: list[Result]) -> str:
    lines = [
        "| shape | generation | trainer / rule | kept | peak GiB | × GKD | step s | × GKD | completion tok/s | "
        "selection s (% of step) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ref = next(
            (x for x in results if x.rule.startswith("GKD") and x.shape == r.shape and x.generation == r.generation),
            None,
        )
        ok_ref = ref is not None and ref.status == "ok"
        mem_ratio = r.peak_gib / ref.peak_gib if ok_ref and r.status == "ok" else float("nan")
        time_ratio = r.step_s / ref.step_s if ok_ref and r.status == "ok" else float("nan")
        gen = "yes" if r.generation else "no"
        if r.status != "ok":
            lines.append(f"| {r.shape} | {gen} | {r.rule} | — | {r.status} | — | — | — | — | — |")
            continue
        sel = "—"
        if not math.isnan(r.selection_s):
            sel = f"{r.selection_s:.4f} ({100 * r.selection_s / r.step_s:.1f}%)"
        lines.append(
            f"| {r.shape} | {gen} | {r.rule} | {fmt(r.kept_frac, '.2f')} | {fmt(r.peak_gib, '.2f')} | "
            f"{fmt(mem_ratio, '.2f')} | {fmt(r.step_s, '.3f')} | {fmt(time_ratio, '.2f')} | "
            f"{fmt(r.tokens_per_s, ',.0f')} | {sel} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", default=DEFAULT_RULES, help="Comma-separated rules (see above).")
    parser.add_argument("--shapes", default="4x2048", help="Comma-separated BxT shapes, e.g. 4x2048,8x4096.")
    parser.add_argument("--prompt", type=int, default=256, help="Prompt tokens per sequence (labels -100).")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--steps", type=int, default=5, help="Timed steps (median reported).")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--generation", action="store_true", help="lmbda=1: sample completions at every step.")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=None, help="tip_chunk_size (default: TIPConfig's).")
    parser.add_argument(
        "--precision",
        choices=("bf16", "amp"),
        default="bf16",
        help="bf16: bf16 weights, no autocast (TrainingArguments bf16=False); amp: bf16=True (autocast).",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="Tiny models and shapes (CPU smoke test).")
    parser.add_argument("--json", default=None, help="Write every result to this JSON file.")
    parser.add_argument("--profile", action="store_true", help="Profile one extra step of --profile-rules.")
    parser.add_argument("--profile-rules", default="GKDTrainer (all tokens),TIP all,TIP entropy_sample 50%")
    parser.add_argument("--profile-dir", default="profiles")
    ns = parser.parse_args(argv)
    ns.profile_rules = [s.strip() for s in ns.profile_rules.split(",")]
    if ns.tiny:
        ns.vocab = min(ns.vocab, 512)
        if ns.shapes == "4x2048":
            ns.shapes = "2x64"
        ns.prompt = min(ns.prompt, 16)
        ns.max_new_tokens = min(ns.max_new_tokens, 8)
    hf_logging.set_verbosity_error()
    device = torch.device(ns.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    rules = parse_rules(ns.rules)
    tokenizer = make_tokenizer(ns.vocab)
    student = make_model("0.5B", ns.vocab, ns.tiny, device, dtype, ns.seed)
    teacher = make_model("1.5B", ns.vocab, ns.tiny, device, dtype, ns.seed + 1).eval()
    init_state = {name: p.detach().to("cpu", copy=True) for name, p in student.named_parameters()}
    header = (
        f"device={torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} torch={torch.__version__} "
        f"student={sum(p.numel() for p in student.parameters()) / 1e6:.0f}M "
        f"teacher={sum(p.numel() for p in teacher.parameters()) / 1e6:.0f}M vocab={ns.vocab} prompt={ns.prompt} "
        f"generation={f'max_new_tokens={ns.max_new_tokens}' if ns.generation else 'no'} "
        f"steps={ns.steps} warmup={ns.warmup} precision={ns.precision}"
    )
    print(header, flush=True)
    results = []
    for shape in [s.strip() for s in ns.shapes.split(",") if s.strip()]:
        for rule in rules:
            r = measure(rule, shape, student, teacher, init_state, tokenizer, ns, device)
            results.append(r)
            print(
                f"  {r.rule:<28} {shape:>8} {r.status:>4} peak={fmt(r.peak_gib, '.2f')} GiB "
                f"step={fmt(r.step_s, '.3f')} s sel={fmt(r.selection_s, '.4f')} s kept={fmt(r.kept_frac, '.2f')} "
                f"times={[round(x, 3) for x in r.step_times]}",
                flush=True,
            )
    if ns.json:
        with open(ns.json, "w") as fh:
            json.dump({"header": header, "results": [asdict(r) for r in results]}, fh, indent=1)
    print()
    print(header)
    print(markdown_table(results))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
