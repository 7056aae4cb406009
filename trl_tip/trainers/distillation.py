"""`TIPDistillationTrainer`: TRL's mainline `DistillationTrainer` that trains only on the tokens that carry signal."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .._compat import DistillationTrainer, last_hidden_state
from ..config import TIPDistillationConfig
from ..selection import TokenSelector
from .common import ForwardView, TIPTrainerMixin, default_config
from .data_checks import check_not_empty, warn_short_dataset
from .rollouts import DistillationFastGeneration


__all__ = ["TIPDistillationTrainer"]

# The multimodal fields `DistillationTrainer._compute_loss` forwards to `_get_last_hidden_state`.
MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


class TIPDistillationTrainer(DistillationFastGeneration, TIPTrainerMixin, DistillationTrainer):
    """TRL's `DistillationTrainer` with token selection: swap two imports, keep everything else.

    The loss computation (`_compute_loss`) is overridden: it runs TRL's own `_get_last_hidden_state` for student and
    teacher, then the [`TokenSelectionEngine`]: signals, selection, the generalized JSD on the kept tokens only, Q1–Q4
    statistics (`tip/...` in the logs). Generation stays TRL's (buffered once per optimizer step; vLLM, tool calling,
    multimodal inputs, FSDP2 / DeepSpeed handling), except that with `use_vllm=False` the fast path
    (`fast_generation`, on by default where it is safe, see [`DistillationFastGeneration`]) samples the step's
    completions in place of TRL's transformers `generate` call.

    It honours what TRL's loss honours: `tool_mask` (tool-output tokens are never eligible), the `lm_head` bias,
    logit scale and final soft-capping, the temperature (the loss is taken at `args.temperature`, as TRL's; the
    selection signals at temperature 1), and `num_items_in_batch` divided by the process count. With
    `token_selection="all"` its loss and gradients equal `DistillationTrainer`'s.

    Args:
        model, teacher_model, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
        quantization_config, peft_config, tools: As in TRL's `DistillationTrainer`.
        args ([`TIPDistillationConfig`], *optional*): Every `DistillationConfig` option plus the token-selection
            options. Without it, as in TRL, the defaults with `output_dir="{model name}-TIPDistillation"`.
        selector ([`TokenSelector`], *optional*): A custom selection rule; replaces `args.token_selection`.
    """

    _tag_names = ["trl", "distillation", "trl-tip"]
    _name = "TIPDistillation"
    _tip_base_trainer = DistillationTrainer

    def __init__(
        self,
        model: Any,
        teacher_model: Any = None,
        args: TIPDistillationConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: list[Callable] | None = None,
        selector: TokenSelector | None = None,
    ):
        if args is None:  # as DistillationTrainer: every default, output_dir "{model name}-TIPDistillation"
            args = default_config(TIPDistillationConfig, model, self._name)
        if not isinstance(args, TIPDistillationConfig):
            raise TypeError(
                f"TIPDistillationTrainer needs a TIPDistillationConfig as `args`, got {type(args).__name__}; build "
                "TIPDistillationConfig(**your_distillation_args)."
            )
        if selector is not None and not callable(selector):
            raise TypeError(f"selector must be callable (signals, context) -> Tensor, got {type(selector).__name__}.")
        check_not_empty(train_dataset, "train_dataset")
        check_not_empty(eval_dataset, "eval_dataset")
        super().__init__(
            model=model,
            teacher_model=teacher_model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
        )
        if self.teacher_model is None:
            raise ValueError("TIPDistillationTrainer needs a teacher: pass teacher_model.")
        warn_short_dataset(train_dataset, args)
        self._init_tip(args, selector, beta=self.beta, temperature=self.temperature)
        self._init_generation(args)

    # ------------------------------------------------------------------ forward passes and loss

    def _tip_backbone(self, unwrapped: nn.Module, view: ForwardView) -> torch.Tensor:
        """TRL's `_get_last_hidden_state` on the completion positions (`(B, K, d)`, column `j` predicting completion
        token `j`)."""
        logits_to_keep = view.input_ids.size(1) - 1 - view.hidden_offset
        return last_hidden_state(
            self, unwrapped, view.input_ids, view.attention_mask, logits_to_keep, **view.model_kwargs
        )

    @staticmethod
    def _view(inputs: dict[str, Any]) -> ForwardView:
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        prompt_len = prompt_ids.size(1)
        # The hidden state at shifted position P - 1 + j predicts completion token j.
        shifted = torch.zeros(input_ids.size(0), input_ids.size(1) - 1, dtype=torch.bool, device=input_ids.device)
        shifted[:, prompt_len - 1 :] = loss_mask.bool()
        prompt_mask = torch.cat([inputs["prompt_mask"].bool(), torch.zeros_like(completion_ids, dtype=torch.bool)], 1)
        return ForwardView(
            input_ids=input_ids,
            attention_mask=attention_mask,
            loss_mask=shifted,
            prompt_mask=prompt_mask,
            hidden_offset=prompt_len - 1,
            model_kwargs={k: inputs[k] for k in MULTIMODAL_KEYS if k in inputs},
        )

    def _generate_and_score_completions(self, inputs):
        """TRL's generation of the optimizer step's rollouts (once per step in training); then, in training, their
        eligible tokens over all processes are recorded: they fix the loss denominator of the step's micro-batches."""
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            loss_mask = output["completion_mask"]
            if output.get("tool_mask") is not None:
                loss_mask = loss_mask * output["tool_mask"]
            self._tip_count_step([loss_mask], micro_batches=self.args.gradient_accumulation_steps)
        return output

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """The loss on the kept completion tokens; returns `(loss, entropy_sum, num_valid)` like TRL's.

        Runs inside the student wrapper's forward (TRL's `compute_loss` routes it through `_forward_redirection`).
        `num_items_in_batch` is TRL's divisor, as TRL's `_compute_loss` uses it in training and evaluation: the
        optimizer step's loss tokens over all processes divided by the process count (training), the caller's count,
        or `None` (the mean over this process's batch). The engine turns it into the rule's denominator
        ([`TokenSelectionEngine.loss_denominator`]), the same code as `TIPTrainer`'s.
        """
        training = self.model.training and torch.is_grad_enabled()
        view = self._view(inputs)
        loss, record = self._tip_loss(
            unwrapped_student, self.teacher_model, view, training=training, base_count=num_items_in_batch
        )
        signals = record.signals
        vocab = unwrapped_student.get_output_embeddings().weight.shape[0]
        # TRL logs the mean student entropy in nats over the loss tokens; ours is taken at temperature 1.
        entropy_sum = (signals.entropy * signals.finite).sum() * math.log(max(vocab, 2))
        num_valid = torch.as_tensor(len(signals), device=loss.device)
        return loss, entropy_sum.detach(), num_valid
