"""`TIPTrainer`: GKD that trains only on the completion tokens that carry signal."""

from __future__ import annotations

import inspect
import os
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import is_peft_available, logging
from trl.models.utils import unwrap_model_for_generation

from ._compat import GKDTrainer
from .config import TIPConfig
from .loss import OutputHead, kept_token_jsd
from .selection import SelectionContext, TokenSelector, assign_quadrants, build_selector, validate_selection
from .signals import TokenSignals, compute_token_signals
from .stats import TIPStatistics


if is_peft_available():
    from peft import PeftModel


__all__ = ["TIPTrainer"]

logger = logging.get_logger(__name__)

TIP_STATE_NAME = "tip_state_rank{rank}.pt"


def _causal_lm(model: nn.Module) -> nn.Module:
    """The `PreTrainedModel` inside accelerate/DeepSpeed/DDP and PEFT wrappers."""
    while hasattr(model, "module") and not hasattr(model, "get_output_embeddings"):
        model = model.module
    if is_peft_available() and isinstance(model, PeftModel):
        model = model.get_base_model()
    return model


def _backbone(lm: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM, whose output is the final (normed) hidden state fed to `lm_head`."""
    backbone = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    if backbone is None or backbone is lm:
        backbone = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"Cannot find the decoder of {type(lm).__name__}; TIPTrainer needs a causal LM with lm_head.")
    return backbone


class TIPTrainer(GKDTrainer):
    """GKD trainer that computes the distillation loss only on selected completion tokens.

    A drop-in replacement for TRL's `GKDTrainer`: generation (`lmbda`, `seq_kd`), the generalized JSD (`beta`) and
    every other GKD and `Trainer` option work unchanged. Per micro-batch it

    1. runs student and teacher to their final hidden states (no full-vocabulary logits with grad),
    2. computes per-token signals chunk by chunk without grad (student entropy, teacher–student divergence, ...),
    3. splits tokens into quadrants Q1–Q4 with thresholds shared by all processes,
    4. keeps a subset with the selection rule (`TIPConfig.token_selection` or a custom `selector`),
    5. computes the generalized JSD on the kept tokens only, from hidden states, in chunks,
    6. accumulates Q1–Q4 statistics that are logged as `tip/...` metrics at each logging step.

    The loss is normalised by the number of kept tokens over all processes and, under gradient accumulation, so that
    the micro-batches of one optimizer step weigh as their share of the step's eligible tokens (counted on the
    generated completions). With `token_selection="all"` the loss and gradients equal `GKDTrainer`'s.

    The arguments `model`, `teacher_model`, `data_collator`, `train_dataset`, `eval_dataset`, `processing_class`,
    `compute_metrics`, `callbacks`, `optimizers`, `preprocess_logits_for_metrics`, `peft_config` and `formatting_func`
    are `GKDTrainer`'s.

    Args:
        args ([`TIPConfig`]):
            The training configuration: every `GKDConfig` option plus the token-selection options.
        selector ([`TokenSelector`], *optional*):
            A custom selection rule; replaces the one named by `args.token_selection`. It is called with the
            [`TokenSignals`] of the eligible tokens and a [`SelectionContext`] and returns a boolean keep-mask or
            non-negative weights of shape `(N,)`.
    """

    _tag_names = ["trl", "gkd", "trl-tip"]
    _name = "TIP"
    # `compute_loss` normalises by the step's token counts itself: `Trainer` must not divide by the accumulation steps.
    loss_is_scaled_for_ga = True
    # Set by a callback such as `TokenDumpCallback` for the steps it dumps: `compute_loss` then keeps the last training
    # micro-batch's per-token data (detached) in `tip_last_selection`; off otherwise, so it costs nothing.
    tip_capture_selection: bool = False
    tip_last_selection: dict[str, Any] | None = None

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
    ):
        if args is None:
            raise ValueError("TIPTrainer needs `args`, a TIPConfig (e.g. TIPConfig(output_dir='out')).")
        if not isinstance(args, TIPConfig):
            raise TypeError(
                f"TIPTrainer needs a TIPConfig as `args`, got {type(args).__name__}; build TIPConfig(**your_gkd_args)."
            )
        if selector is not None and not callable(selector):
            raise TypeError(f"selector must be callable (signals, context) -> Tensor, got {type(selector).__name__}.")
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
        self.selector: TokenSelector = selector if selector is not None else build_selector(args)
        self.tip_statistics = TIPStatistics(self.accelerator.device)
        self._tip_last_logged_step = 0
        self._tip_micro_step = (-1, 0)
        self._supports_logits_to_keep: dict[int, bool] = {}

    # ------------------------------------------------------------------ generation & token counts

    def _generate_on_policy(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """GKD's generation step: student rollouts with probability `lmbda`, else teacher rollouts if `seq_kd`."""
        inputs = self._prepare_inputs(inputs)
        if random.random() <= self.lmbda:
            generator_model, kwargs = (
                self.model_wrapped,
                {"gradient_checkpointing_kwargs": self.args.gradient_checkpointing_kwargs},
            )
        elif self.seq_kd:
            generator_model, kwargs = self.teacher_model, {}
        else:
            return inputs
        with unwrap_model_for_generation(
            generator_model, self.accelerator, generation_kwargs=self.generation_kwargs, **kwargs
        ) as unwrapped_model:
            input_ids, attention_mask, labels = self.generate_on_policy_outputs(
                unwrapped_model, inputs, self.generation_config
            )
        inputs["input_ids"], inputs["attention_mask"], inputs["labels"] = input_ids, attention_mask, labels
        return inputs

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """Fetches the micro-batches of one optimizer step, generates their completions, and counts their tokens.

        GKD generates inside `training_step`, after `Trainer` has counted the dataset's labels; here generation comes
        first, so the count that normalises the loss is the number of completion tokens actually trained on, summed
        over the micro-batches of the step and over processes.
        """
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        batch_samples = [self._generate_on_policy(batch) for batch in batch_samples]
        count = torch.zeros((), dtype=torch.long, device=self.accelerator.device)
        for batch in batch_samples:
            count += (batch["labels"][:, 1:] != -100).sum().to(count.device)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return batch_samples, count

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """A `Trainer` training step; the on-policy generation already happened in [`get_batch_samples`]."""
        return super(GKDTrainer, self).training_step(model, inputs, num_items_in_batch)

    def add_callback(self, callback) -> None:
        """`Trainer.add_callback`; a callback with a `bind_trainer(trainer)` method is also given this trainer.

        `Trainer.__init__` calls this method once its callback handler holds the `callbacks` argument, so those are
        bound too.
        """
        super().add_callback(callback)
        self._bind_trainer_callbacks()

    def _bind_trainer_callbacks(self) -> None:
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "bind_trainer"):
                callback.bind_trainer(self)

    # ------------------------------------------------------------------ forward passes

    def _final_hidden(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Final hidden states `(B, T, d)` of `model`, without building logits for every position."""
        lm = _causal_lm(model)
        key = id(lm)
        if key not in self._supports_logits_to_keep:
            self._supports_logits_to_keep[key] = "logits_to_keep" in inspect.signature(lm.forward).parameters
        captured: list[torch.Tensor] = []

        def hook(module, args, output):
            captured.append(output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state)

        handle = _backbone(lm).register_forward_hook(hook)
        try:
            kwargs = {"logits_to_keep": 1} if self._supports_logits_to_keep[key] else {}
            outputs = model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False, **kwargs
            )
            del outputs
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"The decoder of {type(lm).__name__} did not run; cannot read its hidden states.")
        return captured[-1]

    # ------------------------------------------------------------------ selection

    def _gather_rows(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenates `values` (first dimension may differ per process) over all processes."""
        world = self.accelerator.num_processes
        if world == 1:
            return values
        sizes = self.accelerator.gather(torch.tensor([values.size(0)], device=values.device))
        padded = values.new_zeros((int(sizes.max()), *values.shape[1:]))
        padded[: values.size(0)] = values
        gathered = self.accelerator.gather(padded).view(world, -1, *values.shape[1:])
        return torch.cat([gathered[r, : int(sizes[r])] for r in range(world)])

    def _thresholds(self, signals: TokenSignals) -> tuple[float, float]:
        """Entropy and divergence splits of the quadrants: fixed, or quantiles over every process's tokens."""
        args = self.args
        if args.entropy_threshold is not None:
            return float(args.entropy_threshold), float(args.divergence_threshold)
        finite = signals.finite
        both = self._gather_rows(torch.stack([signals.entropy[finite], signals.divergence[finite]], dim=1))
        if both.size(0) == 0:
            return 0.0, 0.0
        quantiles = torch.tensor(
            [args.entropy_threshold_quantile, args.divergence_threshold_quantile], device=both.device
        )
        entropy_threshold = torch.quantile(both[:, 0].float(), quantiles[0])
        divergence_threshold = torch.quantile(both[:, 1].float(), quantiles[1])
        return float(entropy_threshold), float(divergence_threshold)

    def _selection_generator(self) -> torch.Generator:
        """A CPU generator seeded from the Trainer seed, the optimizer step, the micro-batch and the rank."""
        step = self.state.global_step
        last_step, micro = self._tip_micro_step
        micro = micro + 1 if step == last_step else 0
        self._tip_micro_step = (step, micro)
        seed = (((self.args.seed * 1_000_003 + step) * 10_007 + micro) * 1_009 + self.accelerator.process_index) % (
            2**63 - 1
        )
        return torch.Generator().manual_seed(seed)

    def select_tokens(self, signals: TokenSignals) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
        """Runs thresholds, quadrants and the selection rule on the signals of one micro-batch.

        Args:
            signals ([`TokenSignals`]): Signals of the eligible positions.

        Returns:
            `tuple`: Weights of shape `(N,)` (0 = dropped), quadrant ids of shape `(N,)` (0 for non-finite
            positions), and the `(entropy_threshold, divergence_threshold)` pair.
        """
        entropy_threshold, divergence_threshold = self._thresholds(signals)
        quadrant = assign_quadrants(signals.entropy, signals.divergence, entropy_threshold, divergence_threshold)
        quadrant = torch.where(signals.finite, quadrant, torch.zeros_like(quadrant))
        context = SelectionContext(
            entropy_threshold=entropy_threshold,
            divergence_threshold=divergence_threshold,
            quadrant=quadrant,
            generator=self._selection_generator(),
            global_step=self.state.global_step,
            process_index=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes,
            gather=self._gather_rows,
        )
        selection = self.selector(signals, context)
        weights = validate_selection(selection, len(signals), name=f"selector {self.selector!r}")
        weights = torch.where(signals.finite, weights.to(signals.entropy.device), torch.zeros_like(weights))
        return weights, quadrant, (entropy_threshold, divergence_threshold)

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Generalized JSD on the selected completion tokens, normalised by the kept-token count."""
        args = self.args
        shifted_labels = inputs["labels"][:, 1:]
        seq_idx, pos_idx = (shifted_labels != -100).nonzero(as_tuple=True)

        student_hidden = self._final_hidden(model, inputs)
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_hidden = self._final_hidden(self.teacher_model, inputs)
        # Causal shift: the hidden state at position i predicts the label at i + 1.
        hidden = student_hidden[:, :-1][seq_idx, pos_idx]
        teacher_hidden = teacher_hidden[:, :-1][seq_idx, pos_idx]
        del student_hidden
        targets = shifted_labels[seq_idx, pos_idx]

        student_head = OutputHead.from_model(_causal_lm(model))
        teacher_head = OutputHead.from_model(_causal_lm(self.teacher_model))
        signals = compute_token_signals(
            hidden.detach(),
            teacher_hidden,
            targets,
            student_head,
            teacher_head,
            seq_idx,
            pos_idx,
            beta=self.beta,
            divergence=args.divergence,
            divergence_top_k=args.divergence_top_k,
            chunk_size=args.tip_chunk_size,
        )
        weights, quadrant, thresholds = self.select_tokens(signals)

        kept = (weights > 0).nonzero(as_tuple=True)[0]
        loss_sum = kept_token_jsd(
            hidden[kept],
            teacher_hidden[kept],
            student_head,
            teacher_head,
            weights[kept],
            beta=self.beta,
            chunk_size=args.tip_chunk_size,
        )
        loss = loss_sum * self._loss_scale(weights.sum(), len(signals), num_items_in_batch, model.training)

        if model.training:
            self.tip_statistics.update(signals, quadrant, weights, *thresholds)
        if model.training and self.tip_capture_selection:
            self.tip_last_selection = {
                "input_ids": inputs["input_ids"].detach(),
                "attention_mask": inputs["attention_mask"].detach(),
                "labels": inputs["labels"].detach(),
                "signals": signals,
                "quadrant": quadrant.detach(),
                "weights": weights.detach(),
                "entropy_threshold": thresholds[0],
                "divergence_threshold": thresholds[1],
            }
        if return_outputs:
            from transformers.modeling_outputs import CausalLMOutputWithPast

            return loss, CausalLMOutputWithPast(loss=loss, logits=None)
        return loss

    def _loss_scale(
        self, kept_weight: torch.Tensor, num_eligible: int, num_items_in_batch: Any, training: bool
    ) -> torch.Tensor:
        """Factor turning the kept-token loss sum into this micro-batch's share of the step's loss.

        With `K` the kept weight and `E` the eligible tokens of the micro-batch over all processes, `S` the eligible
        tokens of the whole optimizer step over all processes and `W` the number of processes, the factor is
        `W * E / (S * K)`: each micro-batch contributes its mean over kept tokens, weighted by its share `E / S` of
        the step's tokens (`W` undoes DDP's gradient averaging). With every token kept this is `1 / S`, GKD's
        normalisation; with a constant keep ratio it is the mean over all kept tokens of the step.
        Outside training the loss is the plain mean over this process's kept tokens.
        """
        kept_weight = kept_weight.detach().float()
        if not training or not torch.is_grad_enabled():
            return torch.where(kept_weight > 0, 1.0 / kept_weight.clamp_min(1e-12), torch.zeros_like(kept_weight))
        counts = torch.stack([kept_weight, torch.tensor(float(num_eligible), device=kept_weight.device)])
        world = self.accelerator.num_processes
        if world > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        kept_global, eligible_global = counts[0], counts[1]
        if num_items_in_batch is None:
            step_tokens = eligible_global * getattr(self, "current_gradient_accumulation_steps", 1)
        else:
            step_tokens = torch.as_tensor(num_items_in_batch, device=counts.device).float()
        denominator = step_tokens * kept_global
        return torch.where(
            denominator > 0, world * eligible_global / denominator.clamp_min(1e-12), torch.zeros_like(denominator)
        )

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the `tip/...` statistics accumulated since the last logging step to the training logs."""
        if "loss" in logs and not self.tip_statistics.empty:
            reduce_sum = None
            if self.accelerator.num_processes > 1:

                def reduce_sum(t: torch.Tensor) -> torch.Tensor:
                    return self.accelerator.reduce(t, reduction="sum")

            num_steps = self.state.global_step - self._tip_last_logged_step
            logs.update(self.tip_statistics.compute(reduce_sum, num_steps=num_steps))
            self.tip_statistics.reset()
            self._tip_last_logged_step = self.state.global_step
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints

    def _tip_state(self) -> dict[str, Any]:
        state = {"statistics": self.tip_statistics.state_dict(), "last_logged_step": self._tip_last_logged_step}
        if hasattr(self.selector, "state_dict"):
            state["selector"] = self.selector.state_dict()
        return state

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        output_dir = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, TIP_STATE_NAME.format(rank=self.accelerator.process_index))
        torch.save(self._tip_state(), path)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, TIP_STATE_NAME.format(rank=self.accelerator.process_index))
        if not os.path.isfile(path):
            logger.warning(
                f"{path} is missing ({resume_from_checkpoint} was not written by TIPTrainer with this number of "
                "processes): the token statistics start empty and a stateful selector starts fresh."
            )
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.tip_statistics.load_state_dict(state["statistics"])
        self._tip_last_logged_step = int(state["last_logged_step"])
        if "selector" in state and hasattr(self.selector, "load_state_dict"):
            self.selector.load_state_dict(state["selector"])
