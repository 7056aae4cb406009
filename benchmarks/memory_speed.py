"""Peak GPU memory and step time of trl-tip's trainers against TRL's `GKDTrainer` and `DistillationTrainer`.

One process, one device, the same student and teacher for every row (random weights; the student's are restored to
the same initial values for each row). A row is a trainer (and, for trl-tip, a selection rule); each optimizer step
runs `--grad-accum` micro-batches of `B` sequences exactly as `Trainer.train` runs them, then `optimizer.step()`.

* **Loss step** (default): no generation. Every micro-batch is `B x T` random token ids whose first `--prompt`
  tokens are prompt: GKD's format (`lmbda=0`, `seq_kd=False`) for `GKDTrainer` and `TIPTrainer`, prompt/completion
  tensors for `DistillationTrainer` and `TIPDistillationTrainer` (their generation bypassed).
* **End to end** (`--generation`): every step samples `--max-new-tokens` tokens after prompts of up to `--prompt`
  tokens (lengths vary by up to `--prompt-jitter` from row to row and step to step, left-padded), then trains on them:
  GKD inside `training_step`, one micro-batch at a time; `TIPTrainer` in `get_batch_samples`, all micro-batches at
  once; `DistillationTrainer` and `TIPDistillationTrainer` buffered once per optimizer step, with TRL's transformers
  generation (dynamic cache, no compilation) or, for `TIPDistillationTrainer` on the fast path, trl-tip's step
  generator in its place. trl-tip rows run their config's default `fast_generation='auto'` (on a GPU: the fast path,
  a static cache and a compiled decode step; on CPU: the default path) unless the row prefix sets it.

Rows (`--rules`, comma-separated): `gkd` (TRL GKDTrainer), `dist` (TRL DistillationTrainer), a trl-tip rule
`name[:value]` (TIPTrainer; the value is `keep_ratio`, or the quadrants for `quadrants`, e.g. `quadrants:Q3+Q1`),
`dist/name[:value]` (TIPDistillationTrainer); the prefixes `fast/`, `dyn/`, `distfast/` and `distdyn/` set
`fast_generation=True` (`fast`) or `False` (`dyn`, the dynamic-cache default path) on TIPTrainer or
TIPDistillationTrainer. A rule the installed trl_tip does not know is skipped with a printed note.

Reported per row: peak `torch.cuda.max_memory_allocated` over the timed steps (weights, gradients, optimizer state,
KV caches), the median step time over `--steps` steps after `--warmup` steps (the first warm-up step, which holds
the compilation of the fast path, is reported separately), completion tokens trained per second, every ratio against
`GKDTrainer` and against `DistillationTrainer` (same shape), and for trl-tip rows the selection overhead (signals,
thresholds and selection, timed with CUDA events inside the step) as a share of the step. With `--generation` also:
the generation time per step (the student's `generate` calls, synchronised) and the rest of the step (the loss
step), milliseconds per decode forward, the achieved fraction of the decode bandwidth limit (student weight bytes x
decode forwards / generation time / `--peak-bandwidth`, the H100 SXM's 3,350 GB/s by default: give your device's),
and the `torch.compile` graphs built during the timed steps (0 means no recompilation). `--profile` times the phases
of one more step (generation, loss forward, backward, optimizer) and lists the top CUDA kernels.

Models (`--student`, `--teacher`; random weights, bf16 on a GPU): `0.5B` and `1.5B` (the default pair, Qwen2.5
shapes), `qwen3-4b` and `qwen3-8b` (the TIP paper's pair: the released Qwen3 config.json shapes, `Qwen3ForCausalLM`;
Qwen3-4B ties its embeddings, Qwen3-8B does not). `--lora R` passes every trainer the same `peft_config` (LoRA of rank
R, alpha 2R, on the student's q/k/v/o and gate/up/down projections), as a TRL user would: each trainer wraps the
student with it, the base weights stay frozen, every row starts from the first row's adapter weights, and the student
is unwrapped again after each row. Gradient checkpointing (non-reentrant) is on for every row, as before.

The TIP paper's scale (Qwen3-8B teacher, Qwen3-4B LoRA r64 student, 4x4096, bf16), TRL's DistillationTrainer and
both trl-tip trainers; estimated on paper (docs/benchmarks.md) at ~32-42 GiB peak (weights 22.7 GiB, adapter with its
gradients and AdamW state ~2 GiB, checkpointed activations ~6-10 GiB, logit chunks ~2-3 GiB) and ~2-3 s per step on
an H100 (GKDTrainer's full logits would add ~75 GiB):

    RULES=dist,all,entropy_sample:0.5,tip:0.5,tip:0.2,dist/all,dist/entropy_sample:0.5,dist/tip:0.5,dist/tip:0.2
    python benchmarks/memory_speed.py --student qwen3-4b --teacher qwen3-8b --lora 64 --shapes 4x4096 --rules $RULES
        --steps 2 --warmup 1     # (one line)

(`entropy_sample` is the paper's entropy sampling, `tip` its Soft-OR.) `benchmarks/gpu_session.sh OUT` runs the
default loss step and these rows in one ~9-minute GPU session.

Progress lines are printed as rows finish; the tables come last.

    python benchmarks/memory_speed.py                      # 4x2048, loss step, GKD/Distillation/TIP/TIPDistillation
    python benchmarks/memory_speed.py --shapes 8x4096      # the large case
    python benchmarks/memory_speed.py --generation --shapes 8x640 --prompt 128 --max-new-tokens 512 --grad-accum 4
    python benchmarks/memory_speed.py --tiny               # seconds on a CPU: a smoke test of the harness
    python benchmarks/memory_speed.py --tiny --student qwen3-4b --teacher qwen3-8b --lora 4   # the same, paper pair
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
from transformers import (  # noqa: E402
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.utils import logging as hf_logging  # noqa: E402

import trl_tip  # noqa: E402
import trl_tip.engine as tip_engine_module  # noqa: E402
from trl_tip import TIPConfig, TIPTrainer  # noqa: E402
from trl_tip._compat import DistillationConfig, DistillationTrainer, GKDConfig, GKDTrainer, forward_hooks  # noqa: E402
from trl_tip.selection import TOKEN_SELECTIONS  # noqa: E402


LOSS_RULES = (
    "gkd,dist,all,entropy_topk:0.5,entropy_sample:0.5,quadrants:Q3,tip:0.2,sstoken:0.6,"
    "dist/all,dist/entropy_topk:0.5,dist/entropy_sample:0.5,dist/tip:0.2"
)
# The dynamic-path rows first (before anything is compiled in the process), then the defaults (auto).
GENERATION_RULES = (
    "dist,distdyn/entropy_sample:0.5,dyn/entropy_sample:0.5,gkd,dist/entropy_sample:0.5,entropy_sample:0.5"
)
GIB = 2**30
# Row prefix -> (trainer, label prefix).
# Row prefix -> (trainer, label prefix, fast_generation; None: the config's default, "auto").
ROW_PREFIXES = {
    "": ("tip", "TIP", None),
    "fast": ("tip-fast", "TIP fast", True),
    "dyn": ("tip-dyn", "TIP dynamic", False),
    "dist": ("tip-dist", "TIPDist", None),
    "distfast": ("tip-dist-fast", "TIPDist fast", True),
    "distdyn": ("tip-dist-dyn", "TIPDist dynamic", False),
}
H100_BANDWIDTH_GBS = 3350.0  # H100 SXM5 80GB HBM3 peak memory bandwidth

# Model shapes, random weights. Qwen2.5-0.5B/1.5B: config.json of the released Qwen/Qwen2.5-0.5B and -1.5B.
# Qwen3-4B/8B: config.json of the released Qwen/Qwen3-4B and Qwen/Qwen3-8B (hidden/intermediate sizes, 36 layers,
# 32 query and 8 key/value heads of head_dim 128, rope_theta 1e6, max_position_embeddings 40960; Qwen3-4B ties its
# input and output embeddings, Qwen3-8B does not). Every shape has the vocabulary of `--vocab` (151,936 by default, as released).
# The tiny shapes keep each family's config class, GQA, head_dim and tying (CPU smoke tests).
MODEL_SHAPES = {
    "0.5B": dict(
        family="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "1.5B": dict(
        family="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "qwen3-4b": dict(
        family="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, max_position_embeddings=40960,
    ),
    "qwen3-8b": dict(
        family="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, max_position_embeddings=40960,
    ),
}  # fmt: skip
TINY_SHAPES = {
    "0.5B": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "1.5B": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "qwen3-4b": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16),
    "qwen3-8b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16),
}
# LoRA (`--lora R`, alpha 2R): every attention and MLP projection of the student (ssToken reports LoRA r64 setups).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Rule:
    """One row: a TRL trainer (`gkd`, `dist`) or a trl-tip trainer with a selection rule."""

    trainer: str  # "gkd", "dist", or a trl-tip trainer of ROW_PREFIXES
    label: str
    config: dict = field(default_factory=dict)
    fast_generation: bool | None = None  # None: the config's default ("auto")

    @property
    def is_tip(self) -> bool:
        return self.trainer.startswith("tip")

    @property
    def distillation_format(self) -> bool:
        return self.trainer == "dist" or self.trainer.startswith("tip-dist")


@dataclass
class Result:
    rule: str
    trainer: str
    shape: str
    generation: bool
    grad_accum: int
    status: str = "ok"
    peak_gib: float = float("nan")
    static_gib: float = float("nan")
    step_s: float = float("nan")
    step_times: list = field(default_factory=list)
    warmup_times: list = field(default_factory=list)
    generation_s: float = float("nan")
    loss_s: float = float("nan")
    decode_forwards: float = float("nan")
    ms_per_forward: float = float("nan")
    bandwidth_frac: float = float("nan")
    tokens_per_step: float = float("nan")
    tokens_per_s: float = float("nan")
    selection_s: float = float("nan")
    kept_frac: float = float("nan")
    graphs_warmup: int = 0
    graphs_timed: int = 0
    graph_breaks: int = 0
    prefix_match: float = float("nan")
    profile_s: dict = field(default_factory=dict)  # --profile: seconds per phase of the profiled step, and "step"
    fast_path: bool | None = None  # trl-tip rows: whether the fast path generated (the resolved fast_generation)
    trainable_params: int = 0  # the student's parameters the optimizer updates (with --lora: the adapter's)
    note: str = ""


def parse_rules(spec: str) -> list[Rule]:
    """Parses `gkd,dist,all,fast/entropy_sample:0.5,dist/tip:0.2,...`; unknown trl-tip rules are dropped, noted."""
    rules = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item == "gkd":
            rules.append(Rule("gkd", "GKDTrainer"))
            continue
        if item == "dist":
            rules.append(Rule("dist", "DistillationTrainer"))
            continue
        prefix, _, rule = item.rpartition("/")
        if prefix not in ROW_PREFIXES:
            known = ", ".join(f"{p}/" for p in ROW_PREFIXES if p)
            raise ValueError(f"Unknown row prefix {prefix!r} in {item!r}: use one of {known} (or none).")
        trainer, label_prefix, fast_generation = ROW_PREFIXES[prefix]
        name, _, value = rule.partition(":")
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
            label = f"{label_prefix} quadrants {'+'.join(config['quadrants'])}"
        elif value:
            config["keep_ratio"] = float(value)
            label = f"{label_prefix} {name} {float(value):.0%}"
        else:
            label = f"{label_prefix} {name}"
        rules.append(Rule(trainer, label, config, fast_generation))
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


def model_config(size: str, vocab_size: int, tiny: bool):
    """The `transformers` config of the named shape (`MODEL_SHAPES`; with `tiny`, its `TINY_SHAPES` counterpart)."""
    if size not in MODEL_SHAPES:
        raise ValueError(f"Unknown model shape {size!r}: use one of {', '.join(MODEL_SHAPES)}.")
    shape = dict(MODEL_SHAPES[size])
    family = shape.pop("family")
    if tiny:
        shape.update(TINY_SHAPES[size], num_key_value_heads=2)
        shape.pop("max_position_embeddings", None)
    common = dict(
        vocab_size=vocab_size,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
        use_cache=False,
    )
    if family == "qwen3":
        shape.setdefault("max_position_embeddings", 40960)
        return Qwen3Config(rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, **common, **shape)
    return Qwen2Config(max_position_embeddings=32768, rope_theta=1_000_000.0, **common, **shape)


def make_model(size: str, vocab_size: int, tiny: bool, device: torch.device, dtype: torch.dtype, seed: int):
    config = model_config(size, vocab_size, tiny)
    model_cls = Qwen3ForCausalLM if isinstance(config, Qwen3Config) else Qwen2ForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        # Initialised in `dtype` directly: a float32 copy of the 8B teacher (33 GB) would not sit beside the rest.
        model = model_cls._from_config(config, dtype=dtype)
    # GKD and TIP stop only at max_new_tokens (no EOS id); TRL's DistillationTrainer adds the tokenizer's EOS (id 1),
    # which random weights sample with probability ~1/V per token: its token counts are measured, not assumed.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    # `use_cache=False` above (training) was copied into the generation config, and `generate` fills what a trainer's
    # generation config leaves unset from it: TRL's DistillationTrainer (and TIPDistillationTrainer's default path)
    # would decode without a KV cache, re-running the whole sequence at every token. A Hub checkpoint's generation
    # config leaves it unset (True). GKDTrainer sets `use_cache=False` itself under gradient checkpointing, as in use.
    model.generation_config.use_cache = True
    return model


def n_params(model: torch.nn.Module) -> int:
    """Parameters (tied embeddings counted once: `parameters()` yields a shared parameter once)."""
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's distinct parameter storages (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


# ------------------------------------------------------------------ data


def prompt_lengths(ns, step: int, micro: int, rows: int) -> list[int]:
    """Prompt lengths of one micro-batch: up to `--prompt-jitter` shorter than `--prompt`, varying by row and step."""
    jitter = ns.prompt_jitter
    return [ns.prompt - ((r * 7 + step * 13 + micro * 5) % (jitter + 1)) for r in range(rows)]


def make_step(ns, step: int, batch: int, seq: int, device: torch.device) -> list[dict]:
    """The `--grad-accum` micro-batches of step `step`, in both formats (GKD's and the distillation trainers')."""
    micro_batches = []
    for micro in range(ns.grad_accum):
        g = torch.Generator().manual_seed(ns.seed * 1_000_003 + step * 101 + micro)
        if ns.generation:
            lengths = prompt_lengths(ns, step, micro, batch)
            width = max(lengths)
            prompts = torch.zeros(batch, width, dtype=torch.long)
            mask = torch.zeros(batch, width, dtype=torch.long)
            rows = []
            for r, n in enumerate(lengths):
                ids = torch.randint(2, ns.vocab, (n,), generator=g)
                prompts[r, width - n :], mask[r, width - n :] = ids, 1
                rows.append({"prompt": ids.tolist()})
            gkd = {
                "input_ids": prompts,
                "attention_mask": mask,
                "labels": torch.full_like(prompts, -100),
                "prompts": prompts,
                "prompt_attention_mask": mask,
            }
            micro_batches.append({"gkd": {k: v.to(device) for k, v in gkd.items()}, "dist": rows})
            continue
        input_ids = torch.randint(2, ns.vocab, (batch, seq), generator=g)
        labels = input_ids.clone()
        labels[:, : ns.prompt] = -100
        ones = torch.ones_like(input_ids)
        gkd = {
            "input_ids": input_ids,
            "attention_mask": ones,
            "labels": labels,
            "prompts": input_ids[:, : ns.prompt],
            "prompt_attention_mask": ones[:, : ns.prompt],
        }
        dist = {
            "prompt_ids": input_ids[:, : ns.prompt],
            "prompt_mask": ones[:, : ns.prompt],
            "completion_ids": input_ids[:, ns.prompt :],
            "completion_mask": ones[:, ns.prompt :],
        }
        micro_batches.append(
            {"gkd": {k: v.to(device) for k, v in gkd.items()}, "dist": {k: v.to(device) for k, v in dist.items()}}
        )
    if not ns.generation:
        total = sum(int(m["dist"]["completion_mask"].sum()) for m in micro_batches)
        for m in micro_batches:
            m["dist"]["num_items_in_batch"] = torch.tensor(total, device=device)
    return micro_batches


# ------------------------------------------------------------------ timers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SelectionTimer:
    """Times the signals pass (the engine's `chunked_pass` calls without a loss) and `TokenSelectionEngine.select`
    inside the step (CUDA events, no extra sync)."""

    def __init__(self, trainer, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple] = []
        self._patched = []
        for owner, name in ((tip_engine_module, "chunked_pass"), (trainer.tip_engine, "select")):
            original = getattr(owner, name)
            setattr(owner, name, self._wrap(original))
            self._patched.append((owner, name, original, owner is trainer.tip_engine))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            weights = kwargs["weights"] if "weights" in kwargs else (args[5] if len(args) > 5 else None)
            if getattr(fn, "__name__", "") == "chunked_pass" and weights is not None:
                return fn(*args, **kwargs)  # a loss pass, not the signals pass
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


class PhaseTimer:
    """Wall time of wrapped callables, synchronised before and after each call (instance attributes, restorable)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}
        self.forwards = 0
        self._patched = []

    def wrap(self, owner, attr: str, phase: str, count_forwards: bool = False) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            out = original(*args, **kwargs)
            sync(self.device)
            self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - start
            if count_forwards:
                sequences = out.sequences if hasattr(out, "sequences") else out
                given = kwargs.get("input_ids", args[0] if args else None)
                self.forwards += sequences.size(1) - given.size(1)
            return out

        had = attr in vars(owner)
        setattr(owner, attr, timed)
        self._patched.append((owner, attr, original, had))

    def take(self) -> tuple[dict[str, float], int]:
        totals, forwards = self.totals, self.forwards
        self.totals, self.forwards = {}, 0
        return totals, forwards

    def restore(self) -> None:
        for owner, attr, original, had in reversed(self._patched):
            if had:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)
        self._patched.clear()


def dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process, from torch._dynamo's counters."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


# ------------------------------------------------------------------ trainers


def common_args(ns, batch_size: int, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=ns.grad_accum,
        learning_rate=1e-5,
        beta=0.5,
        temperature=1.0,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=ns.seed,
        # "bf16": bf16 weights trained in bf16 (no autocast); "amp": bf16=True, accelerate's autocast, whose forward
        # returns float32 outputs (GKD's full logits then take twice the memory).
        **({"use_cpu": True, "bf16": False} if ns.device == "cpu" else {"bf16": ns.precision == "amp"}),
    )


def cpu_fast_generator(trainer):
    """On CPU (the smoke test) the `fast/` row runs TIPTrainer's fast-path code with dynamo's eager backend: the
    trainer refuses `fast_generation` without CUDA (inductor's CUDA graphs), so its generator is swapped for one with
    the same static cache, fixed shapes and compile plumbing."""
    from transformers.generation import CompileConfig

    from trl_tip.generation import StepGenerator

    compile_config = CompileConfig(backend="eager", fullgraph=False, dynamic=False, mode=None)
    compile_config._compile_all_devices = True  # private transformers flag: compile on CPU (smoke test only)
    args = trainer.args
    return StepGenerator(
        trainer.generation_config,
        seed=args.seed,
        batch_size=args.per_device_train_batch_size * args.gradient_accumulation_steps,
        pad_to_multiple_of=args.generation_pad_to_multiple_of,
        static_cache=True,
        compile_config=compile_config,
    )


def tip_generation_options(rule: Rule, ns) -> dict:
    """The row's generation options: its bucket and `fast_generation` (left to the default when the prefix sets none;
    on CPU the fast rows are built with the default and get `cpu_fast_generator` afterwards)."""
    options = {"generation_pad_to_multiple_of": ns.pad_to_multiple_of}
    if ns.chunk_size:
        options["tip_chunk_size"] = ns.chunk_size
    if rule.fast_generation is not None and not (rule.fast_generation and ns.device == "cpu"):
        options["fast_generation"] = rule.fast_generation
    return options


def lora_config(ns):
    """`--lora R`: the `peft.LoraConfig` a TRL user passes as `peft_config` (rank R, alpha 2R, no dropout, on the
    student's attention and MLP projections); a fresh one per row, since TRL's trainers may edit the one they get."""
    if not ns.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=ns.lora, lora_alpha=2 * ns.lora, lora_dropout=0.0, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"
    )


def restore_adapter(trainer, ns) -> int:
    """Gives every row the same adapter: the first row's freshly initialised LoRA weights are kept (on the CPU) and
    copied into each later row's; returns the number of trainable parameters. A row whose trainable parameters differ
    from the first row's (another adapter) is an error, not a silent unlike-for-like comparison."""
    trainable = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    if ns.lora and getattr(ns, "adapter_init", None) is None:
        ns.adapter_init = {name: p.detach().to("cpu", copy=True) for name, p in trainable.items()}
    elif ns.lora:
        if set(trainable) != set(ns.adapter_init):
            raise RuntimeError(
                f"--lora: this row's trainable parameters ({len(trainable)}) are not the first row's "
                f"({len(ns.adapter_init)}): the trainers built different adapters from the same peft_config."
            )
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(ns.adapter_init[name])
    return sum(p.numel() for p in trainable.values())


def strip_adapters(model) -> int:
    """Puts back the base layers that `get_peft_model` (called by the trainer, `--lora`) wrapped in the shared
    student, so that the next row's trainer adapts the plain model again; returns how many layers it unwrapped."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    stripped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            stripped += 1
    model.__dict__.pop("peft_config", None)
    model.__dict__.pop("_hf_peft_config_loaded", None)
    return stripped


def build_trainer(rule: Rule, student, teacher, tokenizer, ns, batch_size: int, output_dir: str):
    common = common_args(ns, batch_size, output_dir)
    if rule.distillation_format:
        from trl_tip import TIPDistillationConfig, TIPDistillationTrainer

        dist = dict(max_completion_length=ns.max_new_tokens)
        if rule.trainer == "dist":
            args, cls = DistillationConfig(**common, **dist), DistillationTrainer
        else:
            extra = tip_generation_options(rule, ns)
            args, cls = TIPDistillationConfig(**common, **dist, **rule.config, **extra), TIPDistillationTrainer
        dataset = Dataset.from_dict({"prompt": ["x"] * (batch_size * ns.grad_accum)})
        trainer = cls(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(ns),
        )
        # Random-id prompts: no chat template to apply, the "prompt" fields are the token ids.
        trainer._tokenize_prompts = lambda prompts: (prompts, None, {})
        if not ns.generation:
            # The loss step alone: the prepared micro-batch goes straight to the loss (no generation, no buffer).
            trainer._prepare_inputs = lambda inputs: super(DistillationTrainer, trainer)._prepare_inputs(inputs)
    else:
        gkd = dict(
            lmbda=1.0 if ns.generation else 0.0, seq_kd=False, max_new_tokens=ns.max_new_tokens, max_length=None
        )
        dataset = Dataset.from_dict({"messages": [[{"role": "user", "content": "x"}]] * batch_size})
        if rule.trainer == "gkd":
            args, cls = GKDConfig(**common, **gkd), GKDTrainer
        else:
            extra = tip_generation_options(rule, ns)
            args, cls = TIPConfig(**common, **gkd, **rule.config, **extra), TIPTrainer
        trainer = cls(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            data_collator=lambda rows: rows,
            peft_config=lora_config(ns),
        )
    if rule.fast_generation and ns.device == "cpu":
        print(f"    {rule.label}: on CPU, the static-cache path with dynamo's eager backend (smoke test)", flush=True)
        trainer.tip_generator = cpu_fast_generator(trainer)
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.config.use_cache = False
    trainer.create_optimizer()
    model, optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.model_wrapped, trainer.optimizer = model, optimizer
    trainer.current_gradient_accumulation_steps = ns.grad_accum
    return trainer


def one_step(trainer, rule: Rule, micro_batches: list[dict], ns, capture: list | None = None) -> int:
    """One optimizer step as `Trainer.train` runs it; returns the completion tokens trained on.

    With `capture`, a TIPTrainer row appends each micro-batch's `(prompt width, generated ids)` (on the CPU).
    """
    model = trainer.model_wrapped
    model.train()
    trained = 0
    if rule.distillation_format:
        if ns.generation:
            # TRL's loop hands every micro-batch the step's generation batch; the first generates and buffers.
            generation_batch = [row for m in micro_batches for row in m["dist"]]
            for _ in micro_batches:
                trainer.training_step(model, generation_batch, None)
            trained = sum(int(b["completion_mask"].sum()) for b in trainer._buffered_inputs)
        else:
            for m in micro_batches:
                inputs = dict(m["dist"])
                trainer.training_step(model, inputs, inputs["num_items_in_batch"])
                trained += int(inputs["completion_mask"].sum())
    elif rule.trainer == "gkd":
        inputs = [{k: v.clone() for k, v in m["gkd"].items()} for m in micro_batches]
        count = sum(int((b["labels"][:, 1:] != -100).sum()) for b in inputs)
        if trainer.lmbda > 0:
            # GKD counts the dataset's labels before it generates; with a prompt-only batch that count is 0, so
            # give the number of tokens it will sample (random weights never sample an end of sequence).
            count = sum(b["input_ids"].size(0) for b in inputs) * trainer.args.max_new_tokens
        for b in inputs:
            trainer.training_step(model, b, torch.tensor(count))
            trained += int((b["labels"][:, 1:] != -100).sum())  # GKD replaces the dict's tensors when it generates
    else:
        inputs = [{k: v.clone() for k, v in m["gkd"].items()} for m in micro_batches]
        widths = [b["prompts"].size(1) for b in inputs]
        samples, count = trainer.get_batch_samples(iter(inputs), len(inputs), trainer.accelerator.device)
        if capture is not None:
            capture.extend((w, s["input_ids"].cpu()) for w, s in zip(widths, samples, strict=True))
        for s in samples:
            trainer.training_step(model, s, count)
            trained += int((s["labels"][:, 1:] != -100).sum())
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return trained


# The first step's rollouts of TIPTrainer rows, by (shape, grad_accum, rule options, fast path).
FIRST_ROLLOUTS: dict[tuple, list] = {}


def matching_prefix(a: list, b: list) -> float:
    """Mean over rows of the number of leading completion tokens two first-step rollouts share."""
    lengths = []
    for (width, x), (_, y) in zip(a, b, strict=True):
        x, y = x[:, width:], y[:, width:]
        n = min(x.size(1), y.size(1))
        same = (x[:, :n] == y[:, :n]).int()
        lengths.extend(same.cumprod(1).sum(1).tolist())
    return statistics.mean(lengths)


def release_compiled(*models) -> None:
    """Drops transformers' compiled decode call (and its CUDA graphs) so the next row starts clean."""
    for m in models:
        m.__dict__.pop("_compiled_call", None)
        m.__dict__.pop("_last_compile_config", None)
    torch._dynamo.reset()


def drop_input_grad_hooks(model) -> int:
    """Removes the input-embedding hooks that gradient checkpointing registers (`enable_input_require_grads`).

    The rows share one student module. Each re-enabling of gradient checkpointing after a generation (TRL's
    `unwrap_model_for_generation`, in GKDTrainer and DistillationTrainer) leaves one more such hook behind, so without
    this a row would inherit the hooks leaked by the rows before it and run its forwards slower. The trainer of the
    row registers its own again.
    """
    removed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            for key, hook in list(forward_hooks(module).items()):
                if getattr(hook, "__name__", "") == "make_inputs_require_grads":
                    del forward_hooks(module)[key]
                    removed += 1
    return removed


def measure(rule: Rule, shape: str, student, teacher, init_state, tokenizer, ns, device) -> Result:
    b, t = parse_shape(shape)
    if ns.generation:
        shape = f"{b}x({ns.prompt}+{ns.max_new_tokens})"
    result = Result(rule.label, rule.trainer, shape, ns.generation, ns.grad_accum)
    trainer = timer = phases = None
    oom = False
    try:
        with torch.no_grad():
            for name, p in student.named_parameters():
                p.copy_(init_state[name])
        drop_input_grad_hooks(student)
        with tempfile.TemporaryDirectory() as output_dir:
            trainer = build_trainer(rule, student, teacher, tokenizer, ns, b, output_dir)
            result.trainable_params = restore_adapter(trainer, ns)
            timer = SelectionTimer(trainer, device) if rule.is_tip else None
            phases = PhaseTimer(device)
            phases.wrap(student, "generate", "generation", count_forwards=True)
            graphs0, breaks0 = dynamo_counts()
            step = 0
            warmup, steps = (ns.gkd_warmup, ns.gkd_steps) if rule.trainer == "gkd" else (ns.warmup, ns.steps)
            if rule.is_tip:
                generator = trainer.tip_generator
                result.fast_path = generator is not None and generator.static_cache
                if ns.generation and rule.fast_generation is None:
                    result.rule = f"{rule.label} (auto: {'fast' if result.fast_path else 'dynamic'})"
            gkd_format = rule.is_tip and not rule.distillation_format
            first: list | None = [] if ns.generation and gkd_format else None
            for _ in range(warmup):
                sync(device)
                start = time.perf_counter()
                one_step(trainer, rule, make_step(ns, step, b, t, device), ns, first if step == 0 else None)
                sync(device)
                result.warmup_times.append(time.perf_counter() - start)
                step += 1
                print(f"    {rule.label}: warm-up step {step}: {result.warmup_times[-1]:.2f} s", flush=True)
            if timer:
                timer.take()
            phases.take()
            graphs1, _ = dynamo_counts()
            if device.type == "cuda":
                gc.collect()
                torch.cuda.reset_peak_memory_stats(device)
                result.static_gib = torch.cuda.memory_allocated(device) / GIB
            times, selection, tokens, generation, forwards = [], [], [], [], []
            for _ in range(steps):
                data = make_step(ns, step, b, t, device)
                sync(device)
                start = time.perf_counter()
                tokens.append(one_step(trainer, rule, data, ns, first if step == 0 else None))
                sync(device)
                times.append(time.perf_counter() - start)
                step += 1
                totals, n_forwards = phases.take()
                generation.append(totals.get("generation", 0.0))
                forwards.append(n_forwards)
                if timer:
                    selection.append(timer.take())
            graphs2, breaks2 = dynamo_counts()
            if device.type == "cuda":
                result.peak_gib = torch.cuda.max_memory_allocated(device) / GIB
            result.graphs_warmup, result.graphs_timed, result.graph_breaks = (
                graphs1 - graphs0,
                graphs2 - graphs1,
                (breaks2 - breaks0),
            )
            result.step_times = times
            result.step_s = statistics.median(times)
            result.tokens_per_step = statistics.mean(tokens)
            result.tokens_per_s = result.tokens_per_step / result.step_s
            if ns.generation:
                result.generation_s = statistics.median(generation)
                result.loss_s = statistics.median([s - g for s, g in zip(times, generation, strict=True)])
                result.decode_forwards = statistics.mean(forwards)
                if result.decode_forwards and result.generation_s > 0:
                    per_forward = result.generation_s / result.decode_forwards
                    result.ms_per_forward = 1000 * per_forward
                    result.bandwidth_frac = weight_bytes(student) / per_forward / (ns.peak_bandwidth * 1e9)
            if selection:
                result.selection_s = statistics.median(selection)
            if first:
                # The fast path samples the same rows with the same noise as the default path: their first-step
                # rollouts agree until the forwards' rounding (other kernels, bf16) flips a near-tie; a broken
                # decode would disagree from the first tokens.
                key = (shape, ns.grad_accum, tuple(sorted(rule.config.items(), key=str)))
                FIRST_ROLLOUTS[(*key, result.fast_path)] = first
                other = FIRST_ROLLOUTS.get((*key, not result.fast_path))
                if other is not None:
                    result.prefix_match = matching_prefix(first, other)
            if rule.is_tip:
                with contextlib.suppress(Exception):
                    stats = trainer.tip_statistics.compute(None, num_steps=1)
                    result.kept_frac = float(stats.get("tip/kept_frac", float("nan")))
            if ns.profile and rule.label in ns.profile_rules:
                data = make_step(ns, step, b, t, device)
                result.profile_s = profile_step(trainer, rule, data, shape, ns, phases, timer, device, student)
    except torch.OutOfMemoryError as exc:  # keep going: the next row may fit
        oom = True
        result.status = "OOM"
        result.note = str(exc).split("\n")[0][:200]
    except Exception as exc:  # keep going: report the failure, measure the other rows
        import traceback

        result.status = "error"
        result.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        print(f"  {rule.label} {shape}: FAILED\n" + "".join(traceback.format_exc().splitlines(True)[-25:]), flush=True)
    finally:
        if timer:
            timer.restore()
        if phases:
            phases.restore()
        if trainer is not None:
            trainer.accelerator.free_memory()
        del trainer, timer
        if ns.lora:
            strip_adapters(student)
        if rule.is_tip:
            release_compiled(student, teacher)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if oom:
        print(f"  {rule.label} {shape}: out of memory: {result.note}", flush=True)
    return result


GENERATION_RANGE = "benchmark::generate"


def decode_launches(prof, forwards: int) -> dict[str, float]:
    """Per decode forward of the profiled step's generation (`GENERATION_RANGE`): CUDA kernel launches, CUDA graph
    launches, stream/device synchronisations, host reads of a device value (`aten::_local_scalar_dense`, e.g. the
    stop check) and `torch.compile` CUDA-graph skips so far. A decode step replayed as one CUDA graph shows ~1 graph
    launch and only the eager glue of `generate` (sampler, stop check) as kernel launches; a compiled step whose CUDA
    graphs were skipped launches every kernel of the forward."""
    from torch._dynamo.utils import counters

    events = prof.events()
    ranges = [(e.time_range.start, e.time_range.end) for e in events if e.name == GENERATION_RANGE]
    counts = dict.fromkeys(("kernel_launches", "graph_launches", "syncs", "host_reads"), 0)
    for e in events:
        name = e.name
        if "LaunchKernel" in name:
            key = "kernel_launches"
        elif "GraphLaunch" in name:
            key = "graph_launches"
        elif "Synchronize" in name:
            key = "syncs"
        elif name == "aten::_local_scalar_dense":
            key = "host_reads"
        else:
            continue
        if any(start <= e.time_range.start <= end for start, end in ranges):
            counts[key] += 1
    per = {k: v / max(forwards, 1) for k, v in counts.items()}
    per["cudagraph_skips"] = float(counters["inductor"]["cudagraph_skips"])
    return per


def profile_step(trainer, rule, data, shape, ns, phases: PhaseTimer, timer, device, student=None) -> dict[str, float]:
    """Phases of one step (synchronised wall time) and, on CUDA, its top kernels (torch.profiler); returns the seconds
    of each phase, `other`, `selection` (trl-tip rows) and the whole `step`. With `student`, also the launches per
    decode forward of its generation ([`decode_launches`], printed)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    phases.wrap(trainer, "compute_loss", "loss forward")
    phases.wrap(trainer.accelerator, "backward", "backward")
    phases.wrap(trainer.optimizer, "step", "optimizer")
    if timer:
        timer.take()
    phases.take()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    start = time.perf_counter()
    generate = student.generate if student is not None else None
    if student is not None:

        def labelled(*args, **kwargs):
            with record_function(GENERATION_RANGE):
                return generate(*args, **kwargs)

        student.generate = labelled
    try:
        with profile(activities=activities, record_shapes=False) as prof:
            one_step(trainer, rule, data, ns)
            sync(device)
    finally:
        if student is not None:
            student.generate = generate  # the PhaseTimer's wrapper, restored by it
    total = time.perf_counter() - start
    totals, forwards = phases.take()
    selection = timer.take() if timer else 0.0
    parts = [f"{name} {seconds:.3f} s ({100 * seconds / total:.0f}%)" for name, seconds in totals.items()]
    other = total - sum(totals.values())
    parts.append(f"other {other:.3f} s ({100 * other / total:.0f}%)")
    if timer:
        parts.append(f"of which selection {selection:.4f} s ({100 * selection / total:.1f}%)")
    print(
        f"  profile {rule.label} {shape} GA={ns.grad_accum}: step {total:.3f} s (under the profiler) = {'; '.join(parts)}"
    )
    if student is not None and forwards:
        launches = decode_launches(prof, forwards)
        print(
            f"    per decode forward ({forwards} in the step): {launches['kernel_launches']:.1f} kernel launches, "
            f"{launches['graph_launches']:.2f} CUDA graph launches, {launches['syncs']:.2f} synchronisations, "
            f"{launches['host_reads']:.2f} host reads of a device value; cudagraph skips so far "
            f"{launches['cudagraph_skips']:.0f} (TORCH_LOGS=perf_hints prints why)",
            flush=True,
        )
    averages = prof.key_averages()  # aggregated once: on a long generation step it takes seconds
    try:
        table = averages.table(
            sort_by="device_time_total" if device.type == "cuda" else "cpu_time_total", row_limit=40
        )
    except (AttributeError, KeyError, ValueError):  # older profilers name the CUDA column cuda_time_total
        table = averages.table(sort_by="cuda_time_total", row_limit=40)
    os.makedirs(ns.profile_dir, exist_ok=True)
    tag = f"{rule.label}_{shape}_ga{ns.grad_accum}".replace(" ", "_").replace("%", "")
    with open(os.path.join(ns.profile_dir, f"profile_{tag}.txt"), "w") as fh:
        fh.write(table)
    # Host-side cost (Python hooks, eager glue, synchronisations) does not show in the device-time table.
    with open(os.path.join(ns.profile_dir, f"profile_{tag}_cpu.txt"), "w") as fh:
        fh.write(averages.table(sort_by="self_cpu_time_total", row_limit=50))
    events = sorted(
        averages,
        key=lambda e: (
            getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
            if device.type == "cuda"
            else e.cpu_time_total
        ),
        reverse=True,
    )
    top = []
    for e in events[:8]:
        us = (
            getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
            if device.type == "cuda"
            else e.cpu_time_total
        )
        top.append(f"{e.key[:48]} {us / 1e6:.3f} s")
    print(f"    top {'CUDA' if device.type == 'cuda' else 'CPU'} ops: " + "; ".join(top), flush=True)
    return {**totals, "other": other, **({"selection": selection} if timer else {}), "step": total}


# ------------------------------------------------------------------ tables


def fmt(x: float, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _reference(results: list[Result], r: Result, trainer: str) -> Result | None:
    return next(
        (
            x
            for x in results
            if x.trainer == trainer
            and x.shape == r.shape
            and x.generation == r.generation
            and x.grad_accum == r.grad_accum
            and x.status == "ok"
        ),
        None,
    )


def _ratio(a: float, ref: Result | None, attr: str) -> float:
    if ref is None:
        return float("nan")
    b = getattr(ref, attr)
    return a / b if b and not math.isnan(b) else float("nan")


def loss_rows(results: list[Result], trainers: tuple[str, ...] | None = None) -> list[dict]:
    """The rows of the loss-step table (of `trainers` only, if given): each result's shape, rule and status, and for
    a measured one its kept share, peak memory and step time with their ratios to GKDTrainer (`_x_gkd`) and TRL's
    DistillationTrainer (`_x_dist`) at the same shape (NaN where not measured), tokens/s and selection seconds."""
    rows = []
    for r in results:
        if trainers is not None and r.trainer not in trainers:
            continue
        row = {"shape": r.shape, "rule": r.rule, "status": r.status}
        if r.status == "ok":
            gkd, dist = _reference(results, r, "gkd"), _reference(results, r, "dist")
            row.update(
                kept=r.kept_frac,
                peak_gib=r.peak_gib,
                peak_x_gkd=_ratio(r.peak_gib, gkd, "peak_gib"),
                peak_x_dist=_ratio(r.peak_gib, dist, "peak_gib"),
                step_s=r.step_s,
                step_x_gkd=_ratio(r.step_s, gkd, "step_s"),
                step_x_dist=_ratio(r.step_s, dist, "step_s"),
                tokens_per_s=r.tokens_per_s,
                selection_s=r.selection_s,
            )
        rows.append(row)
    return rows


def loss_table(results: list[Result], trainers: tuple[str, ...] | None = None) -> str:
    lines = [
        "| shape | trainer / rule | kept | peak GiB | × GKD | × Dist | step s | × GKD | × Dist | completion tok/s | "
        "selection s (% of step) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in loss_rows(results, trainers):
        if row["status"] != "ok":
            lines.append(f"| {row['shape']} | {row['rule']} | — | {row['status']} | — | — | — | — | — | — | — |")
            continue
        sel = row["selection_s"]
        sel = "—" if math.isnan(sel) else f"{sel:.4f} ({100 * sel / row['step_s']:.1f}%)"
        lines.append(
            f"| {row['shape']} | {row['rule']} | {fmt(row['kept'], '.2f')} | {fmt(row['peak_gib'], '.2f')} | "
            f"{fmt(row['peak_x_gkd'], '.2f')} | {fmt(row['peak_x_dist'], '.2f')} | {fmt(row['step_s'], '.3f')} | "
            f"{fmt(row['step_x_gkd'], '.2f')} | {fmt(row['step_x_dist'], '.2f')} | {fmt(row['tokens_per_s'], ',.0f')} | "
            f"{sel} |"
        )
    return "\n".join(lines)


def generation_rows(results: list[Result]) -> list[dict]:
    """The rows of the end-to-end table: each result's shape, GA, rule and status, and for a measured one its step,
    generation and loss seconds, tokens/s and peak memory with their ratios to GKDTrainer (`_x_gkd`) and TRL's
    DistillationTrainer (`_x_dist`) at the same shape and GA, decode ms per forward, bandwidth fraction, the first
    warm-up step, the graphs compiled during the timed steps and the selection's share of the step."""
    rows = []
    for r in results:
        row = {"shape": r.shape, "grad_accum": r.grad_accum, "rule": r.rule, "status": r.status}
        if r.status == "ok":
            gkd, dist = _reference(results, r, "gkd"), _reference(results, r, "dist")
            row.update(
                step_s=r.step_s,
                generation_s=r.generation_s,
                loss_s=r.loss_s,
                tokens_per_s=r.tokens_per_s,
                tokens_x_gkd=_ratio(r.tokens_per_s, gkd, "tokens_per_s"),
                tokens_x_dist=_ratio(r.tokens_per_s, dist, "tokens_per_s"),
                peak_gib=r.peak_gib,
                peak_x_gkd=_ratio(r.peak_gib, gkd, "peak_gib"),
                ms_per_forward=r.ms_per_forward,
                bandwidth_frac=r.bandwidth_frac,
                first_step_s=r.warmup_times[0] if r.warmup_times else float("nan"),
                graphs_timed=r.graphs_timed,
                selection_share=r.selection_s / r.step_s,
            )
        rows.append(row)
    return rows


def generation_table(results: list[Result]) -> str:
    lines = [
        "| shape | GA | trainer / rule | step s | generation s | loss s | completion tok/s | × GKD | × Dist | "
        "peak GiB | × GKD | ms / decode fwd | BW frac | 1st step s | graphs (timed) | selection % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in generation_rows(results):
        if row["status"] != "ok":
            lines.append(f"| {row['shape']} | {row['grad_accum']} | {row['rule']} | {row['status']} |" + " — |" * 12)
            continue
        sel = "—" if math.isnan(row["selection_share"]) else f"{100 * row['selection_share']:.2f}%"
        lines.append(
            f"| {row['shape']} | {row['grad_accum']} | {row['rule']} | {fmt(row['step_s'], '.2f')} | "
            f"{fmt(row['generation_s'], '.2f')} | {fmt(row['loss_s'], '.3f')} | {fmt(row['tokens_per_s'], ',.0f')} | "
            f"{fmt(row['tokens_x_gkd'], '.2f')} | {fmt(row['tokens_x_dist'], '.2f')} | {fmt(row['peak_gib'], '.2f')} | "
            f"{fmt(row['peak_x_gkd'], '.2f')} | {fmt(row['ms_per_forward'], '.2f')} | "
            f"{fmt(row['bandwidth_frac'], '.3f')} | {fmt(row['first_step_s'], '.1f')} | {row['graphs_timed']} | {sel} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", default=None, help=f"Rows (see above). Default: {LOSS_RULES}; with --generation "
                        f"{GENERATION_RULES}.")  # fmt: skip
    parser.add_argument("--shapes", default=None, help="Comma-separated BxT shapes (default 4x2048; --generation: "
                        "8x640, where only B is used).")  # fmt: skip
    parser.add_argument("--prompt", type=int, default=None, help="Prompt tokens (default 256; --generation: 128).")
    parser.add_argument("--prompt-jitter", type=int, default=None, help="With --generation, prompt lengths vary "
                        "by up to this many tokens below --prompt (default 24: within one 64-token bucket).")  # fmt: skip
    parser.add_argument("--pad-to-multiple-of", type=int, default=64, help="TIPTrainer's generation bucket.")
    parser.add_argument("--grad-accum", type=int, default=1, help="Micro-batches per optimizer step.")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument(
        "--student",
        default="0.5B",
        choices=tuple(MODEL_SHAPES),
        help="The student's shape "
        "(default 0.5B: Qwen2.5-0.5B; the TIP paper's pair: --student qwen3-4b --teacher qwen3-8b).",
    )
    parser.add_argument(
        "--teacher",
        default="1.5B",
        choices=tuple(MODEL_SHAPES),
        help="The teacher's shape (default 1.5B: Qwen2.5-1.5B).",
    )
    parser.add_argument("--lora", type=int, default=0, metavar="R", help="Train a LoRA adapter of rank R (alpha 2R) "
                        "on the student's attention and MLP projections, passed to every trainer as `peft_config`; "
                        "the base weights stay frozen (default 0: full fine-tuning).")  # fmt: skip
    parser.add_argument("--steps", type=int, default=5, help="Timed steps (median reported).")
    parser.add_argument("--warmup", type=int, default=2, help="Warm-up steps (the first one is reported).")
    parser.add_argument("--gkd-steps", type=int, default=None, help="Timed steps of GKDTrainer rows (default: "
                        "--steps; its end-to-end step at 8x(128+512), GA 4 takes about a minute).")  # fmt: skip
    parser.add_argument("--gkd-warmup", type=int, default=None, help="Warm-up steps of GKDTrainer rows (default: "
                        "--warmup; 0 is fair once an earlier row has warmed the device up).")  # fmt: skip
    parser.add_argument("--generation", action="store_true", help="End to end: sample completions at every step.")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="Default 128; --generation: 512.")
    parser.add_argument("--chunk-size", type=int, default=None, help="tip_chunk_size (default: the config's).")
    parser.add_argument("--peak-bandwidth", type=float, default=H100_BANDWIDTH_GBS, help="Peak memory bandwidth in "
                        "GB/s for the decode bandwidth fraction (default: H100 SXM 3,350; H200: 4,800).")  # fmt: skip
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
    parser.add_argument(
        "--profile-rules", default="GKDTrainer,TIP fast entropy_sample 50%,TIP all,TIP entropy_sample 50%"
    )
    parser.add_argument("--profile-dir", default="profiles")
    ns = parser.parse_args(argv)
    ns.profile_rules = [s.strip() for s in ns.profile_rules.split(",")]
    ns.gkd_steps = ns.steps if ns.gkd_steps is None else ns.gkd_steps
    ns.gkd_warmup = ns.warmup if ns.gkd_warmup is None else ns.gkd_warmup
    if min(ns.steps, ns.gkd_steps) < 1:
        parser.error("--steps and --gkd-steps must be >= 1.")
    if ns.lora < 0:
        parser.error(f"--lora must be a LoRA rank >= 1 (or 0: no adapter), got {ns.lora}.")
    ns.adapter_init = None  # --lora: the first row's adapter weights, given to every row (restore_adapter)
    ns.rules = ns.rules or (GENERATION_RULES if ns.generation else LOSS_RULES)
    ns.shapes = ns.shapes or ("8x640" if ns.generation else "4x2048")
    ns.prompt = ns.prompt if ns.prompt is not None else (128 if ns.generation else 256)
    ns.max_new_tokens = ns.max_new_tokens or (512 if ns.generation else 128)
    ns.prompt_jitter = ns.prompt_jitter if ns.prompt_jitter is not None else (24 if ns.generation else 0)
    if ns.tiny:
        ns.vocab = min(ns.vocab, 512)
        if ns.shapes in ("4x2048", "8x640"):
            ns.shapes = "2x64"
        ns.prompt = min(ns.prompt, 16)
        ns.prompt_jitter = min(ns.prompt_jitter, 6)
        ns.max_new_tokens = min(ns.max_new_tokens, 8)
        ns.pad_to_multiple_of = min(ns.pad_to_multiple_of, 8)
    if ns.generation and ns.prompt_jitter >= ns.prompt:
        parser.error("--prompt-jitter must be smaller than --prompt.")
    hf_logging.set_verbosity_error()
    device = torch.device(ns.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    rules = parse_rules(ns.rules)
    tokenizer = make_tokenizer(ns.vocab)
    student = make_model(ns.student, ns.vocab, ns.tiny, device, dtype, ns.seed)
    teacher = make_model(ns.teacher, ns.vocab, ns.tiny, device, dtype, ns.seed + 1).eval()
    init_state = {name: p.detach().to("cpu", copy=True) for name, p in student.named_parameters()}
    import transformers
    import trl

    header = (
        f"device={torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} torch={torch.__version__} "
        f"transformers={transformers.__version__} trl={trl.__version__} "
        f"student={ns.student}{' (tiny)' if ns.tiny else ''} {n_params(student) / 1e6:.1f}M "
        f"({weight_bytes(student) / 1e9:.2f} GB) teacher={ns.teacher} {n_params(teacher) / 1e6:.1f}M "
        f"({weight_bytes(teacher) / 1e9:.2f} GB) "
        + (f"lora=r{ns.lora}/alpha{2 * ns.lora} on {'+'.join(LORA_TARGETS)} " if ns.lora else "")
        + f"vocab={ns.vocab} prompt={ns.prompt} "
        f"generation={f'max_new_tokens={ns.max_new_tokens} jitter={ns.prompt_jitter}' if ns.generation else 'no'} "
        f"grad_accum={ns.grad_accum} steps={ns.steps} warmup={ns.warmup} precision={ns.precision}"
        + (f" peak_bandwidth={ns.peak_bandwidth:,.0f} GB/s" if ns.generation else "")
    )
    print(header, flush=True)
    results = []
    for shape in [s.strip() for s in ns.shapes.split(",") if s.strip()]:
        for rule in rules:
            r = measure(rule, shape, student, teacher, init_state, tokenizer, ns, device)
            results.append(r)
            gen = f"gen={fmt(r.generation_s, '.2f')} s loss={fmt(r.loss_s, '.3f')} s " if ns.generation else ""
            print(
                f"  {r.rule:<30} {r.shape:>10} GA={r.grad_accum} {r.status:>4} peak={fmt(r.peak_gib, '.2f')} GiB "
                f"step={fmt(r.step_s, '.3f')} s {gen}tok/s={fmt(r.tokens_per_s, ',.0f')} "
                f"sel={fmt(r.selection_s, '.4f')} s kept={fmt(r.kept_frac, '.2f')} trainable={r.trainable_params:,} "
                f"graphs={r.graphs_warmup}+"
                f"{r.graphs_timed} breaks={r.graph_breaks} times={[round(x, 3) for x in r.step_times]}"
                + (f" prefix_match={r.prefix_match:.1f}" if not math.isnan(r.prefix_match) else "")
                + (f" note={r.note}" if r.note else ""),
                flush=True,
            )
            if ns.json:  # after every row: a run cut short still leaves what it measured
                with open(ns.json, "w") as fh:
                    json.dump({"header": header, "results": [asdict(r) for r in results]}, fh, indent=1)
    print()
    print(header)
    if ns.generation:
        print(
            "Ratios: completion tok/s and peak memory against GKDTrainer (× GKD) and TRL DistillationTrainer (× Dist) "
            "at the same shape and GA. BW frac: student weight bytes per decode forward / (ms per forward) / peak "
            "bandwidth. 1st step: the first warm-up step (compilation of the fast path). graphs (timed): torch.compile "
            "graphs built during the timed steps (0: no recompilation)."
        )
        print(generation_table(results))
        for r in results:
            if not math.isnan(r.prefix_match):
                print(
                    f"{r.rule} ({r.shape}, GA {r.grad_accum}): first-step rollouts share on average "
                    f"{r.prefix_match:.1f} of {ns.max_new_tokens} leading tokens with the other TIPTrainer path's "
                    "(same rows, same noise; they part where the two forwards round a near-tie differently)."
                )
    else:
        print("Ratios against GKDTrainer (× GKD) and TRL DistillationTrainer (× Dist), same shape.")
        print(loss_table(results))
        if any(r.trainer == "tip-dist" for r in results):
            print()
            print("TIPDistillationTrainer against DistillationTrainer:")
            print(loss_table(results, trainers=("dist", "tip-dist")))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
