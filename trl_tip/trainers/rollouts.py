"""Generation scheduling shared by both adapters: which path generates (fast or TRL's), and when.

* [`resolve_fast_generation`] turns `fast_generation` (`"auto"`, `True`, `False`) into a decision for this run and
  logs it in one line: the fast path (trl-tip's [`StepGenerator`] with a static KV cache and a compiled decode step)
  runs for a CUDA model that transformers can compile (`_can_compile_fullgraph`), that is not quantized, offloaded, or
  sharded by FSDP or DeepSpeed ZeRO-3, and whose trainer has nothing the fast path cannot reproduce (vLLM, tools,
  multimodal inputs, sampling options it does not implement). `"auto"` takes the default path otherwise; `True`
  refuses with the reason.
* [`build_step_generator`] builds the generator the decision asks for.
* [`GKDStepGeneration`] is `TIPTrainer`'s scheduling: the completions of all micro-batches of an optimizer step are
  generated together in `get_batch_samples` (GKD generates per micro-batch inside `training_step`), with GKD's
  per-micro-batch semantics, and the RNG of a resumed run is restored before that first generation.
* [`DistillationFastGeneration`] is `TIPDistillationTrainer`'s: TRL keeps its buffering (one generation per optimizer
  step), its prompts, EOS handling and logging; only its transformers `generate` call is replaced by the step
  generator when the fast path runs.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn as nn
from transformers import GenerationConfig
from transformers.utils import logging

from .._compat import gkd_parent_training_step, load_rng_state, prepare_inputs
from ..generation import (
    StepGenerator,
    fast_generation_problem,
    no_duplicate_embedding_hooks,
    parse_fast_generation,
    unwrap_for_generation,
)


__all__ = [
    "DistillationFastGeneration",
    "GKDStepGeneration",
    "build_step_generator",
    "resolve_fast_generation",
    "unsupported_sampling_options",
]

logger = logging.get_logger(__name__)

# Generation options the step generator reproduces exactly (sampling warpers, lengths, special tokens) or that do not
# change the samples (the cache and compile settings it replaces with its own).
SUPPORTED_GENERATION_OPTIONS = frozenset(
    {
        "max_new_tokens",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "typical_p",
        "epsilon_cutoff",
        "eta_cutoff",
        "top_h",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "use_cache",
        "cache_implementation",
        "disable_compile",
        "compile_config",
        "return_dict_in_generate",
        "output_scores",
        "output_logits",
        "transformers_version",
        "_from_model_config",
    }
)
# Values of some options that are the same as leaving them unset.
NEUTRAL_VALUES = {"repetition_penalty": 1.0, "num_beams": 1, "num_return_sequences": 1, "do_sample": True}


def unsupported_sampling_options(config: GenerationConfig) -> list[str]:
    """The options of `config` set to something the step generator does not reproduce, as `name=value`."""
    problems = []
    for name, value in sorted(config.to_diff_dict().items()):
        if name in SUPPORTED_GENERATION_OPTIONS and name != "do_sample":
            continue
        if name in NEUTRAL_VALUES and value == NEUTRAL_VALUES[name]:
            continue
        if value is None:
            continue
        problems.append(f"{name}={value!r}")
    if not config.do_sample and "do_sample=False" not in problems:
        problems.append("do_sample=False")
    return problems


def _sharding_problem(trainer) -> str | None:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if getattr(trainer, "is_fsdp_enabled", False):
        return "the student is sharded by FSDP (the weights gathered for each generation are new tensors every time)"
    if is_deepspeed_zero3_enabled():
        return "the student is sharded by DeepSpeed ZeRO-3 (its weights are gathered anew for each generation)"
    return None


def _model_problem(model: nn.Module, device: torch.device) -> str | None:
    from .backbone import causal_lm

    problem = fast_generation_problem(model, device)
    if problem is None and not getattr(causal_lm(model), "_can_compile_fullgraph", False):
        problem = f"transformers cannot compile {type(causal_lm(model)).__name__} with a static cache"
    return problem


def resolve_fast_generation(
    trainer, setting: bool | str, models: list[tuple[str, nn.Module]], blockers: list[str] = ()
) -> bool:
    """Whether the fast path runs for `trainer`; logs the decision and its reason in one line.

    Args:
        trainer: The trainer (its accelerator, FSDP / DeepSpeed state).
        setting: `fast_generation`: `"auto"`, `True` or `False`.
        models: `(name, model)` of each model that generates on-policy (wrapped or not).
        blockers: Reasons the adapter cannot keep its trainer's semantics on the fast path (vLLM, tools, ...).

    Raises:
        ValueError: `setting` is `True` and something rules the fast path out.
    """
    setting = parse_fast_generation(setting)
    if setting is False:
        logger.info("Generation: the default path (fast_generation=False).")
        return False
    device = trainer.accelerator.device
    problems = list(blockers)
    if not problems:
        sharded = _sharding_problem(trainer)
        if sharded:
            problems.append(sharded)
    if not problems:
        for name, model in models:
            problem = _model_problem(trainer.accelerator.unwrap_model(model), device)
            if problem:
                problems.append(f"the {name}: {problem}")
                break
    if problems:
        if setting is True:
            raise ValueError(f"fast_generation=True cannot be used here: {problems[0]}. Use 'auto' or False.")
        logger.info(f"Generation: the default path (fast_generation='auto'): {problems[0]}.")
        return False
    logger.info(
        f"Generation: the fast path (fast_generation={setting!r}): static KV cache and a compiled decode step on "
        f"{device}; the first step compiles it."
    )
    return True


def build_step_generator(
    generation_config: GenerationConfig,
    args,
    accelerator,
    batch_size: int,
    fast: bool,
) -> StepGenerator:
    """The step generator: `fast` adds a static KV cache and transformers' compiled decode step (CUDA graphs).

    The fast path decodes under the accelerator's mixed precision (`torch.autocast`, as accelerate wraps the prepared
    model's forward with it), so the static cache has one dtype at every call, also after something removed that
    wrapper (e.g. a save that unwraps the model without it)."""
    compile_config = autocast_dtype = None
    if fast:
        if getattr(accelerator, "native_amp", False):
            autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
        from transformers.generation import CompileConfig

        # transformers' defaults (CUDA graphs via "reduce-overhead"), with shapes specialised: the cache length and
        # rows per call are fixed, so the decode step compiles once.
        compile_config = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead")
    return StepGenerator(
        generation_config,
        seed=args.seed,
        process_index=accelerator.process_index,
        batch_size=batch_size,
        pad_to_multiple_of=args.generation_pad_to_multiple_of,
        static_cache=fast,
        compile_config=compile_config,
        autocast_dtype=autocast_dtype,
    )


class GKDStepGeneration:
    """`TIPTrainer`'s on-policy generation: once per optimizer step, in `get_batch_samples`, with GKD's semantics."""

    tip_generator: StepGenerator
    _tip_rng_pending: str | None = None
    _tip_rng_restored: str | None = None

    def _init_generation(self, args) -> None:
        """Decides the generation path and builds the step generator (after `Trainer.__init__`)."""
        models = [("student", self.model)]
        if args.seq_kd and args.lmbda < 1.0:
            models.append(("teacher (seq_kd rollouts)", self.teacher_model))
        fast = resolve_fast_generation(self, args.fast_generation, models)
        rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        self.tip_generator = build_step_generator(
            self.generation_config,
            args,
            self.accelerator,
            batch_size=args.per_device_generation_batch_size or rows_per_step,
            fast=fast,
        )

    def _generate_on_policy(self, batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """GKD's generation for the micro-batches of one optimizer step, in as few `generate` calls as allowed.

        Per micro-batch, in order, as GKD: with probability `lmbda` the student generates its completions, else the
        teacher if `seq_kd`, else the dataset's completions are kept. The student's rows (and the teacher's) of all
        micro-batches are generated together; each row's sample depends only on the seed, the step, its index within
        the step and the position, so the result is the one micro-batch-at-a-time generation would give.
        """
        batches = [prepare_inputs(self, batch) for batch in batches]
        draws = [random.random() <= self.lmbda for _ in batches]
        row_ids, offset = [], 0
        for batch in batches:
            rows = batch["prompts"].size(0)
            row_ids.append(torch.arange(offset, offset + rows))
            offset += rows
        student = [i for i, draw in enumerate(draws) if draw]
        teacher = [i for i, draw in enumerate(draws) if not draw and self.seq_kd]
        groups = (
            (student, self.model_wrapped, {"gradient_checkpointing_kwargs": self.args.gradient_checkpointing_kwargs}),
            (teacher, self.teacher_model, {}),
        )
        for indices, model, kwargs in groups:
            if not indices:
                continue
            with unwrap_for_generation(
                model, self.accelerator, generation_kwargs=self.generation_kwargs, **kwargs
            ) as unwrapped_model:
                # The student samples in training mode, as GKD's does from its second micro-batch on (`Trainer` sets
                # it in `training_step`), also at the first step and after an evaluation: one mode, one compiled graph.
                was_training = unwrapped_model.training
                if model is self.model_wrapped:
                    unwrapped_model.train()
                try:
                    rollouts = self.tip_generator.generate(
                        unwrapped_model,
                        prompts=[batches[i]["prompts"] for i in indices],
                        prompt_masks=[batches[i]["prompt_attention_mask"] for i in indices],
                        row_ids=[row_ids[i] for i in indices],
                        step=self.state.global_step,
                    )
                finally:
                    unwrapped_model.train(was_training)
            for i, rollout in zip(indices, rollouts, strict=True):
                batches[i]["input_ids"] = rollout.input_ids
                batches[i]["attention_mask"] = rollout.attention_mask
                batches[i]["labels"] = rollout.labels
        return batches

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """Fetches the micro-batches of one optimizer step, generates their completions, and counts their tokens.

        GKD generates inside `training_step`, after `Trainer` has counted the dataset's labels; here generation comes
        first (for all micro-batches together, see [`_generate_on_policy`]), so the count that normalises the loss
        is the number of completion tokens actually trained on, summed over the micro-batches of the step and over
        processes.
        """
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        if self._tip_rng_pending is not None:
            # Resuming mid-epoch, `Trainer` restores the RNG only after this method returns (the skipped batches
            # must not shift the shuffle); generation happens here, so restore it now and skip the later reload.
            load_rng_state(self, self._tip_rng_pending)
            self._tip_rng_restored, self._tip_rng_pending = self._tip_rng_pending, None
        if batch_samples:
            batch_samples = self._generate_on_policy(batch_samples)
        # The rollouts of the step over all processes: their count is `num_items_in_batch`, and they fix the one
        # loss denominator of every micro-batch of the step.
        count = self._tip_count_step([batch["labels"][:, 1:] != -100 for batch in batch_samples])
        return batch_samples, count

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """`Trainer.training_step` (GKD's own would generate again); generation happened in `get_batch_samples`."""
        return gkd_parent_training_step(self, model, inputs, num_items_in_batch)

    def _load_rng_state(self, checkpoint):
        """Restores the RNG of a checkpoint once: before the first on-policy generation of a resumed run."""
        if checkpoint is not None and checkpoint == self._tip_rng_restored:
            self._tip_rng_restored = None  # already restored in `get_batch_samples`, before generating
            return
        self._tip_rng_pending = None
        load_rng_state(self, checkpoint)

    def _load_tip_state(self, checkpoint: str) -> None:
        super()._load_tip_state(checkpoint)
        # The first step of the resumed run generates in `get_batch_samples`, before `Trainer` restores the RNG.
        self._tip_rng_pending = checkpoint


class DistillationFastGeneration:
    """`TIPDistillationTrainer`'s fast path: TRL's `_generate_single_turn` with the step generator in place of its
    transformers `generate` call, when [`resolve_fast_generation`] chose it.

    TRL still tokenizes the prompts, buffers one generation per optimizer step (`_prepare_inputs`), pads, counts and
    logs the completions; this returns what its transformers path returns, each row's completion up to and including
    its first EOS, sampled with TRL's sampling options by the batch-invariant sampler (noise keyed by the seed, the
    step, the process and the row, not by the global RNG).
    """

    tip_generator: StepGenerator | None = None
    # Training draws at step `s` use noise step `s`; evaluations use their own range, so they never share noise with
    # the training rows of the same step (and a resumed run samples what the uninterrupted one did).
    EVAL_STEP_OFFSET = 2**31

    def _init_generation(self, args) -> None:
        blockers = []
        if self.use_vllm:
            blockers.append("TRL's vLLM generates (use_vllm=True)")
        if self.tools:
            blockers.append("tool calling runs TRL's multi-turn generation loop")
        if self._is_vlm:
            blockers.append("the processing class is multimodal (images go through TRL's generation)")
        unsupported = unsupported_sampling_options(self.generation_config)
        if unsupported:
            blockers.append(f"the fast path does not implement the generation option(s) {', '.join(unsupported)}")
        if args.fast_generation is True and self.use_vllm:
            raise ValueError(
                "fast_generation=True and use_vllm=True ask for two generation back-ends; set one (vLLM generates "
                "with use_vllm=True, trl-tip's fast path with use_vllm=False)."
            )
        fast = resolve_fast_generation(self, args.fast_generation, [("student", self.model)], blockers)
        self.tip_generator = None
        if fast:
            rows = args.per_device_train_batch_size * args.gradient_accumulation_steps
            self.tip_generator = build_step_generator(
                self.generation_config, args, self.accelerator, batch_size=rows, fast=True
            )
        self._tip_generation_step: tuple[str, int] | None = None
        self._tip_generation_rows = 0

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        """TRL's single generation turn; on the fast path, sampled by the step generator (see the class).

        TRL's own turn (default path) runs as it is, except that the input-embedding hook its
        `unwrap_model_for_generation` leaks at each call is removed ([`no_duplicate_embedding_hooks`]): with TRL's
        `DistillationTrainer` every forward of step `n` calls `n` identical hooks.
        """
        if self.tip_generator is None or images is not None or multimodal_fields or has_tool_images:
            with no_duplicate_embedding_hooks(self.accelerator.unwrap_model(self.model_wrapped)):
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        device = self.accelerator.device
        pad = self._tokenizer.pad_token_id
        width = max(len(ids) for ids in prompt_ids)
        prompts = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
        masks = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for row, ids in enumerate(prompt_ids):
            if len(ids):
                prompts[row, width - len(ids) :] = torch.as_tensor(ids)
                masks[row, width - len(ids) :] = 1
        prompts, masks = prompts.to(device), masks.to(device)
        step, first_row = self._generation_keys(len(prompt_ids))
        with unwrap_for_generation(
            self.model_wrapped,
            self.accelerator,
            generation_kwargs=self.generation_kwargs,
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
        ) as unwrapped:
            rollout = self.tip_generator.generate(
                unwrapped, [prompts], [masks], [torch.arange(first_row, first_row + len(prompt_ids))], step=step
            )[0]
        lengths = rollout.attention_mask[:, width:].sum(1).tolist()
        completions = rollout.input_ids[:, width:].cpu()
        return [completions[row, :length].tolist() for row, length in enumerate(lengths)]

    def _generation_keys(self, rows: int) -> tuple[int, int]:
        """The noise step and the first row index of this call's rows (rows count on within a step and mode)."""
        mode = "train" if self.model.training else "eval"
        step = self.state.global_step + (0 if mode == "train" else self.EVAL_STEP_OFFSET)
        if self._tip_generation_step != (mode, step):
            self._tip_generation_step, self._tip_generation_rows = (mode, step), 0
        first = self._tip_generation_rows
        self._tip_generation_rows += rows
        return step, first
