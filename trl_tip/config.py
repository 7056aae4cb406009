"""The configs: `TIPConfig(GKDConfig)` and `TIPDistillationConfig(DistillationConfig)`.

The token-selection options are declared once, in the [`TIPArguments`] dataclass both configs inherit, and validated
once, by [`TIPArguments.validate_tip_arguments`] against the rule registry (`trl_tip.selection.registry`). A plug-in's
own options (e.g. the `sstoken` rule's) are a dataclass it registers with `trl_tip.plugins.register_arguments`, which
both configs inherit too (in their field order: after the token-selection options).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from functools import cache

from ._compat import DistillationConfig, GKDConfig
from .generation import parse_fast_generation
from .plugins import plugin_arguments
from .selection import QUADRANTS, parse_quadrants
from .selection.base import reads_teacher_signals
from .selection.registry import (
    KEEP_RATIO,
    OPTIONS,
    RULES,
    OptionSpec,
    build_selector,
    check_option,
    get_rule,
    keep_ratio_defaults,
    one_of,
    option_default,
)
from .signals import DIVERGENCES


TEACHER_SIGNALS = ("all", "kept")

__all__ = ["TIPArguments", "TIPConfig", "TIPDistillationConfig", "TIPGenerationArguments"]


@dataclass
class TIPArguments:
    r"""
    The token-selection options shared by [`TIPConfig`] and [`TIPDistillationConfig`].

    Each completion token gets two signals, the student entropy `H` (divided by `ln V`) and the teacher–student
    divergence `D` (by default the token's training loss; with `beta=1` the TIP paper's `KL(student || teacher)`). A
    selection rule keeps a subset, and the distillation loss is computed on the kept tokens only. Median thresholds on
    both axes split tokens into quadrants Q1 (high H, high D), Q2 (high H, low D), Q3 (low H, high D: confident and
    wrong) and Q4 (low H, low D) for the logged statistics and the quadrant rules. See `docs/fidelity.md` for how each
    rule maps to the TIP and ssToken papers.

    Parameters:
        > Parameters that control which tokens are trained on

        token_selection (`str`, *optional*, defaults to `"entropy_sample"`):
            Selection rule. The TIP paper's: `"tip"` (Soft-OR, Eq. 7–8), `"q3_score"` (Q3-only, Section 7.3),
            `"entropy_sample"` (entropy sampling, Table 3), `"divergence_topk"` (Table 8 ablation); ssToken's:
            `"sstoken"`; trl-tip's own: `"all"` (every token, exactly the trainer's own loss), `"random"`,
            `"entropy_topk"`, `"entropy_divergence_sample"`, `"quadrants"`, `"quadrant_budget"`.
        keep_ratio (`float`, *optional*):
            Share of the eligible tokens kept by the budgeted rules, in `(0, 1]`. Defaults to the rule's own default
            (`0.5`; `0.1` for `q3_score` and `divergence_topk`; `0.6` for `sstoken`); must stay unset for `all` and
            `quadrants`.
        budget_scope (`str`, *optional*):
            Budgeted rules: `"rollout"` (the share of each rollout, `⌊keep_ratio · m⌋` of its `m` tokens; `⌈·⌉` for
            `sstoken`) or `"batch"` (the share of the process's micro-batch, rounded half up; `entropy_topk` cuts at a
            quantile over all processes). Default `"rollout"` for `tip`, `q3_score`, `divergence_topk` and `sstoken`,
            `"batch"` for the others.
        score_order (`str`, *optional*):
            `tip`, `q3_score`, `divergence_topk`, `entropy_topk`, `sstoken` (default `"highest"`): `"lowest"` keeps
            the lowest-scored tokens instead (the paper's Table 6 control is `tip` with `"lowest"`).
        entropy_clip_quantile (`float`, *optional*):
            `tip`, `q3_score` (default `0.98`): the entropy is clipped at this quantile of the micro-batch's tokens
            over all processes before its min–max normalisation, in `(0, 1]` (`1` clips nothing).
        entropy_alpha (`float`, *optional*):
            `entropy_sample` and `entropy_divergence_sample` (default `1.0`): exponent `alpha` on the entropy in the
            sampling weight `H^alpha * D^gamma`.
        divergence_gamma (`float`, *optional*):
            `entropy_divergence_sample` (default `1.0`): exponent `gamma` on the divergence in the sampling weight.
        sampling_estimator (`str`, *optional*):
            `entropy_sample`, `entropy_divergence_sample` (default `"fixed_budget"`): `"fixed_budget"` draws exactly
            the budget without replacement; `"importance_weighted"` (TIP Appendix A.3) keeps each token independently
            with probability `p = min(1, c · weight)` (expected share `keep_ratio`), weights it `1 / p` and divides
            the loss by the eligible count, an unbiased estimate of the all-token loss.
        quadrants (`list[str]`, *optional*):
            `quadrants` only: quadrants kept, e.g. `["Q3"]` or `["Q1", "Q3"]`.
        q3_share (`float`, *optional*):
            `quadrant_budget` only (default `0.5`): share of the budget reserved for Q3 tokens.

        > Parameters that control the signals and the quadrant split

        divergence (`str`, *optional*, defaults to `"loss"`):
            Divergence of the second axis: `"loss"` (the token's training loss, the generalized JSD with `beta`; the
            paper's `KL(student || teacher)` with `beta=1`, at no extra cost), `"reverse_kl"`
            (`KL(student || teacher)`), `"forward_kl"` (`KL(teacher || student)`) or `"jsd"` (symmetric, divided by
            `ln 2`, in `[0, 1]`).
        divergence_top_k (`int`, *optional*):
            Restrict the divergence to the teacher's top-k tokens, renormalised (not with `divergence="loss"`).
        entropy_threshold (`float`, *optional*):
            Fixed entropy split of the quadrants, in `[0, 1]`. Give both fixed thresholds or neither.
        divergence_threshold (`float`, *optional*):
            Fixed divergence split of the quadrants (in `[0, 1]` for `jsd`, `>= 0` for the others).
        entropy_threshold_quantile (`float`, *optional*, defaults to `0.5`):
            Without fixed thresholds, the entropy split is this quantile of the micro-batch's eligible tokens over
            all processes (`0.5`: the median). Each micro-batch is split by its own quantiles: the step's tokens are
            not all known when the first micro-batch is selected.
        divergence_threshold_quantile (`float`, *optional*, defaults to `0.5`):
            Likewise for the divergence split.
        tip_chunk_size (`int`, *optional*, defaults to `1024`):
            Positions whose full-vocabulary logits are materialised at once, in the signals and in the loss.
        teacher_signals (`str`, *optional*, defaults to `"all"`):
            `"all"`: the teacher's logits and signals on every eligible token, so the Q1–Q4 statistics cover every
            token. `"kept"`: for a rule that reads no signal of the teacher (`entropy_topk`, `entropy_sample`,
            `random`, `entropy_divergence_sample` with `divergence_gamma=0`), the teacher's `lm_head` runs on the
            kept tokens only, in the loss pass (the selection is the same); the quadrant split, the `tip/q*/...`
            metrics and `tip/divergence`, `tip/teacher_*` then describe the kept tokens, and the records hold NaN
            teacher signals on the dropped ones. An error for a rule that reads the teacher's signals.

    """

    token_selection: str = field(
        default="entropy_sample",
        metadata={
            "help": "Selection rule. The TIP paper's: `tip` (Soft-OR), `q3_score`, `entropy_sample`, "
            "`divergence_topk`; ssToken's: `sstoken`; trl-tip's: `all` (exactly the trainer's own loss), `random`, "
            "`entropy_topk`, `entropy_divergence_sample`, `quadrants`, `quadrant_budget`.",
        },
    )
    keep_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Share of the eligible tokens kept by the budgeted rules, in (0, 1]. Defaults to the rule's "
            f"default ({keep_ratio_defaults()}); leave unset for `all` and `quadrants`."
        },
    )
    budget_scope: str | None = field(
        default=None,
        metadata={
            "help": "Budgeted rules: `rollout` (keep_ratio of each rollout) or `batch` (of the process's micro-batch). "
            "Default `rollout` for tip, q3_score, divergence_topk, sstoken; `batch` for the others.",
        },
    )
    score_order: str | None = field(
        default=None,
        metadata={
            "help": "tip, q3_score, divergence_topk, entropy_topk, sstoken (default `highest`): `lowest` keeps the "
            "lowest-scored tokens (the paper's bottom-k control).",
        },
    )
    entropy_clip_quantile: float | None = field(
        default=None,
        metadata={
            "help": "tip, q3_score (default 0.98): quantile of the micro-batch's entropies the entropy is clipped at "
            "before min-max normalisation, in (0, 1] (1 = no clipping)."
        },
    )
    entropy_alpha: float | None = field(
        default=None,
        metadata={
            "help": "entropy_sample, entropy_divergence_sample (default 1.0): exponent alpha on the entropy in the "
            "sampling weight H^alpha * D^gamma (>= 0)."
        },
    )
    divergence_gamma: float | None = field(
        default=None,
        metadata={
            "help": "entropy_divergence_sample (default 1.0): exponent gamma on the divergence in the sampling weight "
            "(>= 0)."
        },
    )
    sampling_estimator: str | None = field(
        default=None,
        metadata={
            "help": "entropy_sample, entropy_divergence_sample (default `fixed_budget`): `fixed_budget` (draw the "
            "budget without replacement) or `importance_weighted` (Poisson sampling, 1/p weights, loss divided by the "
            "eligible count: unbiased).",
        },
    )
    quadrants: list[str] | None = field(
        default=None,
        metadata={"help": "quadrants only: quadrants kept, e.g. `Q3` or `Q1 Q3`."},
    )
    q3_share: float | None = field(
        default=None,
        metadata={"help": "quadrant_budget only (default 0.5): share of the budget reserved for Q3 tokens."},
    )
    divergence: str = field(
        default="loss",
        metadata={
            "help": "Divergence of the second axis: `loss` (the per-token training loss; KL(student || teacher) with "
            "beta=1), `reverse_kl`, `forward_kl` or `jsd` (symmetric, divided by ln 2).",
            "choices": list(DIVERGENCES),
        },
    )
    divergence_top_k: int | None = field(
        default=None,
        metadata={
            "help": "Restrict the divergence to the teacher's top-k tokens, renormalised (>= 1; not with "
            "divergence=loss)."
        },
    )
    entropy_threshold: float | None = field(
        default=None,
        metadata={"help": "Fixed entropy split of the quadrants, in [0, 1]. Give both fixed thresholds or neither."},
    )
    divergence_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Fixed divergence split of the quadrants ([0, 1] for jsd, >= 0 for the others). Give both fixed "
            "thresholds or neither."
        },
    )
    entropy_threshold_quantile: float = field(
        default=0.5,
        metadata={
            "help": "Without fixed thresholds, the entropy split is this quantile of the micro-batch's eligible tokens "
            "over all processes (0.5 = median); each micro-batch is split by its own quantiles."
        },
    )
    divergence_threshold_quantile: float = field(
        default=0.5,
        metadata={"help": "Without fixed thresholds, the divergence split is this quantile (0.5 = median)."},
    )
    tip_chunk_size: int = field(
        default=1024,
        metadata={"help": "Positions whose full-vocabulary logits are materialised at once (signals and loss)."},
    )
    teacher_signals: str = field(
        default="all",
        metadata={
            "help": "`all`: the teacher's signals on every eligible token (complete Q1-Q4 statistics). `kept`: for a "
            "rule that reads no teacher signal (entropy_topk, entropy_sample, random), the teacher's lm_head runs on "
            "the kept tokens only; the Q1-Q4 and teacher statistics then describe the kept tokens.",
            "choices": list(TEACHER_SIGNALS),
        },
    )

    def validate_tip_arguments(self) -> None:
        """Checks every token-selection option and fills in the rule's defaults.

        Raises:
            ValueError: naming the option and the allowed values, for an unknown rule, a value out of range, or an
                option given for a rule that does not read it.
        """
        self._check_number_types()
        rule = get_rule(self.token_selection)
        # Which rule-specific options the user set (before defaults are filled in), for the cross-option checks.
        given = frozenset(name for name in OPTIONS if getattr(self, name, None) is not None)

        if self.keep_ratio is not None:
            if not rule.budgeted:
                budgeted = [name for name, spec in RULES.items() if spec.budgeted]
                raise ValueError(
                    f"keep_ratio is not used by token_selection={rule.name!r}; it applies to {', '.join(budgeted)}. "
                    "Leave keep_ratio unset."
                )
            check_option(KEEP_RATIO, self.keep_ratio)
        elif rule.budgeted:
            self.keep_ratio = rule.default_keep_ratio

        for name in sorted(given - set(rule.options)):
            readers = [spec.name for spec in RULES.values() if name in spec.options]
            if name == "quadrants":
                raise ValueError(
                    f"quadrants is only used with token_selection='quadrants', got token_selection={rule.name!r}. "
                    "Leave quadrants unset or use token_selection='quadrants'."
                )
            raise ValueError(
                f"{name} only applies to token_selection={' or '.join(repr(r) for r in readers)}, got "
                f"token_selection={rule.name!r}. Leave {name} unset or use a rule that reads it."
            )
        for name in rule.options:
            spec = OPTIONS[name]
            if getattr(self, name) is None:
                if name in rule.required:
                    raise ValueError(self._missing_option_message(rule.name, name))
                setattr(self, name, option_default(rule, name))
            if getattr(self, name) is not None:
                check_option(spec, getattr(self, name))
        if rule.name == "quadrants":
            self.quadrants = [QUADRANTS[i - 1] for i in parse_quadrants(self.quadrants)]
        if rule.validate is not None:
            rule.validate(self, given)
        self._validate_signal_options()

    def _check_number_types(self) -> None:
        """A numeric option given as another type (e.g. the string `"0.5"` from an untyped YAML or CLI path) raises a
        `TypeError` naming the option, instead of failing later in a comparison or silently misbehaving."""
        for name, kind in _numeric_fields().items():
            value = getattr(self, name, None)
            if value is None:
                continue
            allowed = (int, float)  # a float for an int option is refused by its own range check
            if isinstance(value, bool) or not isinstance(value, allowed):
                example = "an integer" if kind == "int" else "a number"
                raise TypeError(
                    f"{name} must be {example}, got {type(value).__name__} {value!r}; pass e.g. "
                    f"{name}={'1' if kind == 'int' else '0.5'} (values read from YAML or the command line must "
                    "be converted to numbers)."
                )

    @staticmethod
    def _missing_option_message(rule: str, name: str) -> str:
        if name == "quadrants":
            return (
                "token_selection='quadrants' needs `quadrants`, a non-empty subset of "
                f"{', '.join(QUADRANTS)} (e.g. quadrants=['Q3'])."
            )
        return f"token_selection={rule!r} needs `{name}`."

    def _validate_signal_options(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence={self.divergence!r} is unknown; allowed values: {', '.join(DIVERGENCES)}.")
        if self.divergence_top_k is not None:
            if self.divergence_top_k < 1:
                raise ValueError(f"divergence_top_k must be a positive integer or None, got {self.divergence_top_k}.")
            if self.divergence == "loss":
                allowed = ", ".join(d for d in DIVERGENCES if d != "loss")
                raise ValueError(
                    "divergence_top_k does not apply to divergence='loss' (the training loss has no top-k form); use "
                    f"divergence_top_k with divergence among {allowed}, or leave divergence_top_k unset."
                )
        fixed = (self.entropy_threshold is not None, self.divergence_threshold is not None)
        if fixed[0] != fixed[1]:
            raise ValueError(
                "Give both entropy_threshold and divergence_threshold (fixed quadrant split) or neither (quantile "
                f"split); got entropy_threshold={self.entropy_threshold}, "
                f"divergence_threshold={self.divergence_threshold}."
            )
        if self.entropy_threshold is not None and not 0.0 <= self.entropy_threshold <= 1.0:
            raise ValueError(f"entropy_threshold must be in [0, 1] (entropy / ln V), got {self.entropy_threshold}.")
        if self.divergence_threshold is not None:
            upper = 1.0 if self.divergence == "jsd" else float("inf")
            if not 0.0 <= self.divergence_threshold <= upper:
                allowed = "[0, 1]" if self.divergence == "jsd" else ">= 0"
                raise ValueError(
                    f"divergence_threshold must be {allowed} for divergence={self.divergence!r}, got "
                    f"{self.divergence_threshold}."
                )
        for name in ("entropy_threshold_quantile", "divergence_threshold_quantile"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        if self.tip_chunk_size < 1:
            raise ValueError(f"tip_chunk_size must be >= 1, got {self.tip_chunk_size}.")
        check_option(
            OptionSpec("teacher_signals", check=one_of("teacher_signals", TEACHER_SIGNALS)), self.teacher_signals
        )
        if self.teacher_signals == "kept" and reads_teacher_signals(build_selector(self)):
            raise ValueError(
                f"teacher_signals='kept' needs a rule that reads no signal of the teacher (e.g. entropy_topk, "
                f"entropy_sample, random); token_selection={self.token_selection!r} reads the teacher's signals on "
                "every token. Leave teacher_signals='all'."
            )


@cache
def _numeric_fields() -> dict[str, str]:
    """`"float"` or `"int"` for each numeric field of [`TIPArguments`] and of the plug-ins' arguments, from the resolved
    type hints (not from `Field.type`, which `HfArgumentParser` rewrites in place)."""
    kinds = {}
    hints = {}
    for cls in (TIPArguments, *plugin_arguments()):
        hints.update(typing.get_type_hints(cls))
    for name, hint in hints.items():
        args = typing.get_args(hint) or (hint,)
        if float in args:
            kinds[name] = "float"
        elif int in args and bool not in args:
            kinds[name] = "int"
    return kinds


def check_liger_kernel(args) -> None:
    """Refuses `use_liger_kernel=True`: what it is set for on a distillation trainer cannot apply.

    Liger's gain for distillation is a fused loss that never builds the full logits; trl-tip computes its own loss
    from the final hidden states, chunked and on the kept tokens only, so that part would be silently dropped. The
    layer kernels the flag would still patch into the student are available explicitly (see the message).
    """
    if getattr(args, "use_liger_kernel", False):
        raise ValueError(
            "use_liger_kernel=True is not supported by trl-tip: its loss is computed from the final hidden states, "
            "in chunks and on the kept tokens only (never the full logits), so Liger's fused loss has nothing to "
            "replace and the flag would be ignored for the loss. Leave use_liger_kernel unset. For Liger's layer "
            "kernels (RMSNorm, RoPE, SwiGLU) on the student, patch its architecture before loading it, e.g. "
            "liger_kernel.transformers.apply_liger_kernel_to_qwen2(fused_linear_cross_entropy=False); or load it "
            "with model_init_kwargs={'use_kernels': True} (Hub kernels, TRL's replacement for use_liger_kernel)."
        )


FAST_GENERATION_HELP = (
    "'auto' (default), True or False. The fast path generates with a static KV cache and a compiled decode step "
    "(torch.compile, CUDA graphs): several times faster on a GPU after a one-off compile at the first step. 'auto' "
    "runs it for a CUDA student transformers can compile that is not quantized, offloaded, FSDP- or ZeRO-3-sharded "
    "(and, in TIPDistillationTrainer, without vLLM, tools, multimodal inputs or sampling options it does not "
    "implement), else the default path; one log line says which and why. True refuses where it cannot run."
)


@dataclass
class TIPGenerationArguments:
    r"""
    The on-policy generation options shared by [`TIPConfig`] and [`TIPDistillationConfig`].

    Parameters:
        > Parameters that control the on-policy generation

        fast_generation (`str` or `bool`, *optional*, defaults to `"auto"`):
            `"auto"`, `True` or `False` (the strings `"true"` / `"false"` from a command line too). The fast path
            generates the step's rollouts with trl-tip's step generator: a static KV cache, transformers' compiled
            decode step (`torch.compile` with CUDA graphs) and a batch-invariant sampler; several times faster on a
            GPU, after a one-off compilation at the first step (torch's compile caches shorten it in later runs) and
            whenever a longer prompt bucket needs a longer cache. `"auto"` runs it where it is safe: a CUDA student
            that transformers can compile with a static cache (`_can_compile_fullgraph`) and that is not quantized,
            offloaded (`device_map` to CPU/disk), or sharded by FSDP or DeepSpeed ZeRO-3; for
            `TIPDistillationTrainer` also only with `use_vllm=False`, no tools, a text-only processing class and
            sampling options it implements (`temperature`, `top_k`, `top_p`, `min_p`, ...; not e.g.
            `repetition_penalty`). Otherwise the default path runs (TRL's own generation for
            `TIPDistillationTrainer`); one log line (info) says which path runs and why. `True` raises where `"auto"`
            would fall back; `False` always takes the default path. A compilation failure at run time falls back
            to the default path with a warning.
        generation_pad_to_multiple_of (`int`, *optional*, defaults to `64`):
            Prompts are left-padded to a multiple of this for generation, so the shapes of the `generate` calls repeat
            (the fast path compiles once per bucket). The trained sequences keep their own padding.
    """

    fast_generation: str = field(default="auto", metadata={"help": FAST_GENERATION_HELP})
    generation_pad_to_multiple_of: int = field(
        default=64,
        metadata={"help": "Prompts are left-padded to a multiple of this for generation, so shapes repeat."},
    )

    def validate_generation_arguments(self) -> None:
        """Normalises `fast_generation` to `"auto"`, `True` or `False` and checks the bucket size."""
        self.fast_generation = parse_fast_generation(self.fast_generation)
        if self.generation_pad_to_multiple_of < 1:
            raise ValueError(
                f"generation_pad_to_multiple_of must be a positive integer, got {self.generation_pad_to_multiple_of}."
            )
        if self.fast_generation is True and self.use_cpu:
            raise ValueError(
                "fast_generation=True needs a CUDA device (torch.compile with CUDA graphs), but use_cpu=True. Use "
                "fast_generation='auto' (the default path on CPU) or False."
            )


@dataclass
class TIPConfig(*plugin_arguments(), TIPArguments, TIPGenerationArguments, GKDConfig):
    r"""
    Configuration class for [`TIPTrainer`]: every option of TRL's `GKDConfig` plus the token-selection options of
    [`TIPArguments`], the generation options of [`TIPGenerationArguments`] and the one below.

    TIPTrainer generates the completions of all micro-batches of an optimizer step together (GKD: one micro-batch at a
    time), with GKD's semantics per micro-batch (the `lmbda` draw, `seq_kd` teacher rollouts, `temperature`, EOS and
    padding). Its sampling noise depends only on the seed, the step, the row's index within the step and the position,
    so the samples do not depend on how the rows are batched (see `trl_tip.generation`).

    Parameters:
        > Parameters that control the on-policy generation

        per_device_generation_batch_size (`int`, *optional*):
            Rows (prompts) per `generate` call on each process. Defaults to all the rows of an optimizer step
            (`per_device_train_batch_size * gradient_accumulation_steps`); lower it to bound the generation memory.
    """

    per_device_generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Rows per generate call on each process; defaults to all rows of an optimizer step "
            "(per_device_train_batch_size * gradient_accumulation_steps)."
        },
    )

    def __post_init__(self):
        check_liger_kernel(self)
        super().__post_init__()
        self.validate_tip_arguments()
        self.validate_generation_arguments()
        if self.per_device_generation_batch_size is not None and self.per_device_generation_batch_size < 1:
            raise ValueError(
                "per_device_generation_batch_size must be a positive integer or None (all rows of the step), got "
                f"{self.per_device_generation_batch_size}."
            )


@dataclass
class TIPDistillationConfig(*plugin_arguments(), TIPArguments, TIPGenerationArguments, DistillationConfig):
    r"""
    Configuration class for [`TIPDistillationTrainer`]: every option of TRL's `DistillationConfig` plus the
    token-selection options of [`TIPArguments`] and the generation options of [`TIPGenerationArguments`] (with
    `use_vllm=False`, the fast path replaces TRL's transformers `generate` call; TRL's buffering per optimizer step,
    `max_completion_length`, sampling options and `generation_kwargs` still apply).
    """

    def __post_init__(self):
        check_liger_kernel(self)
        super().__post_init__()
        self.validate_tip_arguments()
        self.validate_generation_arguments()
