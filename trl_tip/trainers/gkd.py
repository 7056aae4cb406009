"""`TIPTrainer`: TRL's `GKDTrainer` that trains only on the completion tokens that carry signal."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from transformers.utils import logging

from .._compat import GKDTrainer
from .._quiet import quiet_logger
from ..config import TIPConfig
from ..generation import StepGenerator, fast_generation_problem, unwrap_for_generation
from ..models import load_student_and_teacher
from ..selection import TokenSelector
from .common import ForwardView, TIPTrainerMixin, backbone_hidden, check_peft_student, default_config
from .data_checks import (
    check_chat_columns,
    check_chat_template,
    check_conversations,
    check_not_empty,
    warn_long_conversations,
    warn_short_dataset,
)


__all__ = ["TIPTrainer"]

logger = logging.get_logger(__name__)

# The start of the hint `GKDTrainer.__init__` logs when `DistillationTrainer` covers the configuration.
GKD_MIGRATION_HINT = "is fully covered by `DistillationTrainer`"


class TIPTrainer(TIPTrainerMixin, GKDTrainer):
    """GKD trainer that computes the distillation loss only on selected completion tokens.

    A drop-in replacement for TRL's `GKDTrainer`: generation (`lmbda`, `seq_kd`), the generalized JSD (`beta`) and
    every other GKD and `Trainer` option work unchanged. Per micro-batch it

    1. runs student and teacher to their final hidden states (no full-vocabulary logits with grad),
    2. computes per-token signals chunk by chunk without grad (student entropy, teacher–student divergence, ...),
    3. splits tokens into quadrants Q1–Q4 with thresholds shared by all processes,
    4. keeps a subset with the selection rule (`TIPConfig.token_selection` or a custom `selector`),
    5. computes the generalized JSD on the kept tokens only, from hidden states, in chunks,
    6. accumulates Q1–Q4 statistics that are logged as `tip/...` metrics at each logging step.

    Steps 2–6 are the trainer-agnostic [`TokenSelectionEngine`]; this class adds GKD's generation and the forwards.

    Every micro-batch of an optimizer step divides its kept-token loss sum by one denominator fixed before any
    forward: the tokens the rule plans to keep of the step's rollouts over all processes (its budget; every eligible
    token for `all` and for rules whose kept share depends on the data), counted on the generated completions. So the
    gradient does not depend on how the step is split into micro-batches or processes, and with
    `token_selection="all"` the loss and gradients equal `GKDTrainer`'s.

    The arguments `model`, `teacher_model`, `data_collator`, `train_dataset`, `eval_dataset`, `processing_class`,
    `compute_metrics`, `callbacks`, `optimizers`, `preprocess_logits_for_metrics`, `peft_config` and `formatting_func`
    are `GKDTrainer`'s.

    Args:
        args ([`TIPConfig`], *optional*):
            The training configuration: every `GKDConfig` option plus the token-selection options. Without it, as
            TRL's trainers do, the defaults with `output_dir="{model name}-TIP"`.
        selector ([`TokenSelector`], *optional*):
            A custom selection rule; replaces the one named by `args.token_selection`. It is called with the
            [`TokenSignals`] of the eligible tokens and a [`SelectionContext`] and returns a boolean keep-mask or
            non-negative weights of shape `(N,)`.
        quantization_config (`transformers.BitsAndBytesConfig`, *optional*):
            Quantization of a student given as a model id or path (as in `SFTTrainer`); it can also be set in
            `args.model_init_kwargs["quantization_config"]`. A 4-bit or 8-bit student needs a `peft_config`: it is
            prepared with PEFT's `prepare_model_for_kbit_training` before the adapter is added.
        teacher_quantization_config (`transformers.BitsAndBytesConfig`, *optional*):
            Quantization of a teacher given as a model id or path (or `args.teacher_model_init_kwargs`).
    """

    _tag_names = ["trl", "gkd", "trl-tip"]
    _name = "TIP"
    _tip_base_trainer = GKDTrainer
    # `compute_loss` normalises by the step's token counts itself: `Trainer` must not divide by the accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | str | None = None,
        teacher_model: nn.Module | str | None = None,
        args: TIPConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        preprocess_logits_for_metrics: Callable | None = None,
        peft_config: Any = None,
        formatting_func: Callable | None = None,
        selector: TokenSelector | None = None,
        quantization_config: Any = None,
        teacher_quantization_config: Any = None,
    ):
        if args is None:  # as TRL's trainers do: every default, output_dir "{model name}-TIP"
            args = default_config(TIPConfig, model, self._name)
        if not isinstance(args, TIPConfig):
            raise TypeError(
                f"TIPTrainer needs a TIPConfig as `args`, got {type(args).__name__}; build TIPConfig(**your_gkd_args)."
            )
        if selector is not None and not callable(selector):
            raise TypeError(f"selector must be callable (signals, context) -> Tensor, got {type(selector).__name__}.")
        check_not_empty(train_dataset, "train_dataset")
        check_not_empty(eval_dataset, "eval_dataset")
        if data_collator is None:
            check_chat_columns(train_dataset, "train_dataset")
            check_chat_columns(eval_dataset, "eval_dataset")
            check_conversations(train_dataset, "train_dataset")
            check_conversations(eval_dataset, "eval_dataset")
            check_chat_template(processing_class, train_dataset, eval_dataset)
        model, teacher_model = load_student_and_teacher(
            model, teacher_model, args, peft_config, quantization_config, teacher_quantization_config
        )
        # The models are instantiated now: GKD/SFT must not see the init kwargs again (they would warn or raise).
        init_kwargs = (args.model_init_kwargs, args.teacher_model_init_kwargs)
        args.model_init_kwargs = args.teacher_model_init_kwargs = None
        # GKD's "consider migrating to DistillationTrainer" hint names TRL's classes; ours is logged below instead.
        with quiet_logger(GKDTrainer.__module__, GKD_MIGRATION_HINT):
            super().__init__(
                model=model,
                teacher_model=teacher_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                peft_config=peft_config,
                formatting_func=formatting_func,
            )
        args.model_init_kwargs, args.teacher_model_init_kwargs = init_kwargs
        warn_short_dataset(train_dataset, args)
        if data_collator is None:
            for dataset, name in ((train_dataset, "train_dataset"), (eval_dataset, "eval_dataset")):
                warn_long_conversations(dataset, self.processing_class, args.max_length, name)
        if args.lmbda == 1.0 and args.temperature == 1.0:
            logger.info(
                "With lmbda=1.0 and temperature=1.0 this run is also covered by TIPDistillationTrainer (TRL's "
                "DistillationTrainer with token selection: vLLM generation, a chunked loss); see the trl-tip docs."
            )
        check_peft_student(self.model)
        self._init_tip(args, selector, beta=self.beta, temperature=1.0)
        self._tip_rng_pending: str | None = None
        self._tip_rng_restored: str | None = None
        self.tip_generator = self._build_generator(args)

    # ------------------------------------------------------------------ generation & token counts

    def _build_generator(self, args: TIPConfig) -> StepGenerator:
        """The step-level generator: GKD's sampling settings, batched per optimizer step, optionally compiled."""
        compile_config = None
        if args.fast_generation:
            from transformers.generation import CompileConfig

            self._check_fast_generation(args)
            # transformers' defaults (CUDA graphs via "reduce-overhead"), with shapes specialised: the cache length
            # and rows per call are fixed, so the decode step compiles once.
            compile_config = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead")
        rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        return StepGenerator(
            self.generation_config,
            seed=args.seed,
            process_index=self.accelerator.process_index,
            batch_size=args.per_device_generation_batch_size or rows_per_step,
            pad_to_multiple_of=args.generation_pad_to_multiple_of,
            static_cache=args.fast_generation,
            compile_config=compile_config,
        )

    def _check_fast_generation(self, args: TIPConfig) -> None:
        """Refuses `fast_generation` where the compiled static-cache decode cannot run safely."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if self.is_fsdp_enabled or is_deepspeed_zero3_enabled():
            raise ValueError(
                "fast_generation=True is not supported with FSDP or DeepSpeed ZeRO-3: the weights gathered for each "
                "generation are new tensors, which the CUDA graphs of the compiled decode step cannot reuse. Leave "
                "fast_generation=False."
            )
        models = [("student", self.model)]
        if args.seq_kd and args.lmbda < 1.0:
            models.append(("teacher (seq_kd rollouts)", self.teacher_model))
        for name, model in models:
            problem = fast_generation_problem(self.accelerator.unwrap_model(model), self.accelerator.device)
            if problem:
                raise ValueError(
                    f"fast_generation=True cannot be used here: the {name}: {problem}. Leave fast_generation=False."
                )

    def _generate_on_policy(self, batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """GKD's generation for the micro-batches of one optimizer step, in as few `generate` calls as allowed.

        Per micro-batch, in order, as GKD: with probability `lmbda` the student generates its completions, else the
        teacher if `seq_kd`, else the dataset's completions are kept. The student's rows (and the teacher's) of all
        micro-batches are generated together; each row's sample depends only on the seed, the step, its index within
        the step and the position, so the result is the one micro-batch-at-a-time generation would give.
        """
        batches = [self._prepare_inputs(batch) for batch in batches]
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
            super()._load_rng_state(self._tip_rng_pending)
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
        """A `Trainer` training step; the on-policy generation already happened in [`get_batch_samples`]."""
        return super(GKDTrainer, self).training_step(model, inputs, num_items_in_batch)

    # ------------------------------------------------------------------ forward passes and loss

    def _tip_backbone(self, unwrapped: nn.Module, view: ForwardView) -> torch.Tensor:
        """Final hidden states `(B, T - 1, d)`, without logits: the decoder stack is called directly."""
        return backbone_hidden(unwrapped, view)

    @staticmethod
    def _view(inputs: dict[str, Any]) -> ForwardView:
        labels, attention_mask = inputs["labels"], inputs["attention_mask"]
        labelled = labels != -100
        seq_len = labels.size(1)
        first = torch.where(
            labelled.any(1), labelled.int().argmax(1), torch.full_like(labelled[:, 0], seq_len, dtype=torch.long)
        )
        positions = torch.arange(seq_len, device=labels.device)
        prompt_mask = attention_mask.bool() & (positions[None, :] < first[:, None])
        return ForwardView(
            input_ids=inputs["input_ids"],
            attention_mask=attention_mask,
            loss_mask=labelled[:, 1:],
            prompt_mask=prompt_mask,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Generalized JSD on the selected completion tokens, normalised by the step's planned kept tokens.

        The whole computation runs inside `model`'s forward (`_forward_redirection`), so that DDP, FSDP and DeepSpeed
        see one forward per micro-batch and keep the student's parameters (`lm_head` included) materialised for it.
        """
        view = self._view(inputs)
        training = model.training and torch.is_grad_enabled()
        unwrapped = self.accelerator.unwrap_model(model)
        loss = self._forward_redirection(
            model,
            unwrapped,
            self._tip_loss_inside_forward,
            unwrapped,
            view,
            training,
            num_items_in_batch,
        )
        if return_outputs:
            from transformers.modeling_outputs import CausalLMOutputWithPast

            logits = None
            if not training and self.compute_metrics is not None and not self.args.prediction_loss_only:
                # `compute_metrics` reads the student's logits, as from GKDTrainer; the loss above never builds them.
                with torch.no_grad():
                    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            return loss, CausalLMOutputWithPast(loss=loss, logits=logits)
        return loss

    def _tip_loss_inside_forward(self, unwrapped, view, training, num_items_in_batch):
        # GKD divides by `num_items_in_batch` (the step's tokens over all processes); trl-tip also undoes DDP's
        # averaging of the processes' gradients, as DistillationTrainer does, so a process divides by its share.
        base_count = num_items_in_batch
        if training and num_items_in_batch is not None and self.accelerator.num_processes > 1:
            base_count = num_items_in_batch / self.accelerator.num_processes
        loss, _ = self._tip_loss(unwrapped, self.teacher_model, view, training=training, base_count=base_count)
        return loss

    # ------------------------------------------------------------------ checkpoints

    def _load_rng_state(self, checkpoint):
        """Restores the RNG of a checkpoint once: before the first on-policy generation of a resumed run."""
        if checkpoint is not None and checkpoint == self._tip_rng_restored:
            self._tip_rng_restored = None  # already restored in `get_batch_samples`, before generating
            return
        self._tip_rng_pending = None
        super()._load_rng_state(checkpoint)

    def _load_tip_state(self, checkpoint: str) -> None:
        super()._load_tip_state(checkpoint)
        # The first step of the resumed run generates in `get_batch_samples`, before `Trainer` restores the RNG.
        self._tip_rng_pending = checkpoint
