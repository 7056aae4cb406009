"""`TIPTrainer`: TRL's `GKDTrainer` that trains only on the completion tokens that carry signal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from transformers.utils import logging

from .._compat import GKDTrainer
from .._quiet import quiet_logger
from ..config import TIPConfig
from ..loss import undo_output_cast
from ..models import load_student_and_teacher
from ..selection import TokenSelector
from .backbone import backbone_hidden, check_peft_student
from .common import ForwardView, TIPTrainerMixin, default_config
from .data_checks import (
    check_chat_columns,
    check_chat_template,
    check_conversations,
    check_not_empty,
    warn_long_conversations,
    warn_short_dataset,
)
from .rollouts import GKDStepGeneration


__all__ = ["TIPTrainer"]

logger = logging.get_logger(__name__)

# The start of the hint `GKDTrainer.__init__` logs when `DistillationTrainer` covers the configuration.
GKD_MIGRATION_HINT = "is fully covered by `DistillationTrainer`"


class TIPTrainer(GKDStepGeneration, TIPTrainerMixin, GKDTrainer):
    """GKD trainer that computes the distillation loss only on selected completion tokens.

    A drop-in replacement for TRL's `GKDTrainer`: generation (`lmbda`, `seq_kd`), the generalized JSD (`beta`) and
    every other GKD and `Trainer` option work unchanged. Per micro-batch it

    1. runs student and teacher to their final hidden states (no full-vocabulary logits with grad),
    2. computes per-token signals chunk by chunk without grad (student entropy, teacher–student divergence, ...),
    3. splits tokens into quadrants Q1–Q4 with thresholds shared by all processes,
    4. keeps a subset with the selection rule (`TIPConfig.token_selection` or a custom `selector`),
    5. computes the generalized JSD on the kept tokens only, from hidden states, in chunks,
    6. accumulates Q1–Q4 statistics that are logged as `tip/...` metrics at each logging step.

    Steps 2–6 are the trainer-agnostic [`TokenSelectionEngine`]; this class adds the forwards, and
    [`GKDStepGeneration`] GKD's generation, once per optimizer step (fast by default on a GPU: `fast_generation`).

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
        self._init_generation(args)

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
        loss = undo_output_cast(loss, self.__dict__.pop("_tip_inner_loss", None))  # GKDTrainer's loss is not cast
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
        self._tip_inner_loss = loss
        return loss
