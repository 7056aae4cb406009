"""`TIPDistillationTrainer`: TRL's mainline `DistillationTrainer` that trains only on the tokens that carry signal."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .._compat import DistillationTrainer
from ..config import TIPDistillationConfig
from ..selection import TokenSelector
from .common import ForwardView, TIPTrainerMixin
from .data_checks import check_not_empty
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
        args ([`TIPDistillationConfig`]): Every `DistillationConfig` option plus the token-selection options.
        selector ([`TokenSelector`], *optional*): A custom selection rule; replaces `args.token_selection`.
    """

    _tag_names = ["trl", "distillation", "trl-tip"]
    _name = "TIPDistillation"

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
        if args is None:
            raise ValueError(
                "TIPDistillationTrainer needs `args`, a TIPDistillationConfig (e.g. "
                "TIPDistillationConfig(output_dir='out'))."
            )
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
        self._init_tip(args, selector, beta=self.beta, temperature=self.temperature)
        self._init_generation(args)

    # ------------------------------------------------------------------ forward passes and loss

    def _tip_backbone(self, unwrapped: nn.Module, view: ForwardView) -> torch.Tensor:
        """TRL's `_get_last_hidden_state` on the completion positions (`(B, K, d)`, column `j` predicting completion
        token `j`)."""
        logits_to_keep = view.input_ids.size(1) - 1 - view.hidden_offset
        return self._get_last_hidden_state(
            unwrapped, view.input_ids, view.attention_mask, logits_to_keep, **view.model_kwargs
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

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """The loss on the kept completion tokens; returns `(loss, entropy_sum, num_valid)` like TRL's.

        Runs inside the student wrapper's forward (TRL's `compute_loss` routes it through `_forward_redirection`).
        `num_items_in_batch` is TRL's count of the optimizer step's loss tokens over all processes divided by the
        process count (training), or `None` (evaluation: the mean over this process's kept tokens).
        """
        training = self.model.training and torch.is_grad_enabled()
        step_tokens = None
        if training and num_items_in_batch is not None:
            step_tokens = num_items_in_batch * self.accelerator.num_processes
        view = self._view(inputs)
        loss, record = self._tip_loss(
            unwrapped_student,
            self.teacher_model,
            view,
            training=training,
            step_tokens=step_tokens,
            micro_batches_per_step=self.args.gradient_accumulation_steps,
        )
        signals = record.signals
        vocab = unwrapped_student.get_output_embeddings().weight.shape[0]
        # TRL logs the mean student entropy in nats over the loss tokens; ours is taken at temperature 1.
        entropy_sum = (signals.entropy * signals.finite).sum() * math.log(max(vocab, 2))
        num_valid = torch.as_tensor(len(signals), device=loss.device)
        return loss, entropy_sum.detach(), num_valid
