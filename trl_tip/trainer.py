"""`TIPTrainer`: GKD that trains only on the completion tokens that carry signal."""

from __future__ import annotations

import inspect
import os
import random
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import is_peft_available, logging
from trl.models.utils import unwrap_model_for_generation

from ._compat import GKDTrainer
from .attention import capture_last_attention_inputs, prompt_attention_mass
from .callbacks import HistoryEMACallback
from .config import SSTOKEN_DEFAULTS, TIPConfig
from .history import ModelHistory
from .loss import OutputHead, kept_token_jsd, token_jsd_with_signals
from .models import init_kwargs_are_quantized, load_causal_lm, prepare_quantized_student
from .selection import (
    PROMPT_ATTENTION,
    AllTokens,
    SelectionContext,
    TokenSelector,
    assign_quadrants,
    build_selector,
    validate_selection,
)
from .signals import TokenSignals, compute_token_signals, history_token_losses
from .stats import TIPStatistics


if is_peft_available():
    from peft import PeftModel


__all__ = ["TIPTrainer"]

logger = logging.get_logger(__name__)

TIP_STATE_NAME = "tip_state_rank{rank}.pt"
HISTORY_STATE_NAME = "sstoken_history.pt"


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


def _check_chat_columns(dataset: Any, name: str) -> None:
    """Raises a clear error if `dataset` lacks the `messages` column that GKD's default collator reads.

    `DataCollatorForChatML` tokenizes each example's `messages` (unless it is pre-tokenized with `input_ids`);
    without them training would stop at the first batch with a bare `KeyError: 'messages'`.
    """
    datasets = dataset.items() if isinstance(dataset, dict) else [(None, dataset)]
    for key, split in datasets:
        columns = getattr(split, "column_names", None)
        if not isinstance(columns, (list, tuple)) or "messages" in columns or "input_ids" in columns:
            continue  # no dataset, columns unknown (e.g. an IterableDataset without features), or usable
        label = name if key is None else f"{name}[{key!r}]"
        raise ValueError(
            f"{label} has columns {list(columns)}, but TIPTrainer (like GKDTrainer) reads a `messages` column: the "
            "conversation as a list of {'role': ..., 'content': ...} dicts ending with the assistant's answer. "
            "Convert it, e.g. dataset.map(lambda x: {'messages': [{'role': 'user', 'content': x['prompt']}, "
            "{'role': 'assistant', 'content': x['completion']}]}), or pass your own data_collator."
        )


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
        quantization_config (`transformers.BitsAndBytesConfig`, *optional*):
            Quantization of a student given as a model id or path (as in `SFTTrainer`); it can also be set in
            `args.model_init_kwargs["quantization_config"]`. A 4-bit or 8-bit student needs a `peft_config`: it is
            prepared with PEFT's `prepare_model_for_kbit_training` before the adapter is added.
        teacher_quantization_config (`transformers.BitsAndBytesConfig`, *optional*):
            Quantization of a teacher given as a model id or path (or `args.teacher_model_init_kwargs`).
    """

    _tag_names = ["trl", "gkd", "trl-tip"]
    # Extra per-token inputs a selector may list in its `requires` attribute (computed only when asked).
    EXTRA_SIGNALS = ("history_nll", "history_divergence", PROMPT_ATTENTION)
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
        quantization_config: Any = None,
        teacher_quantization_config: Any = None,
    ):
        if args is None:
            raise ValueError("TIPTrainer needs `args`, a TIPConfig (e.g. TIPConfig(output_dir='out')).")
        if not isinstance(args, TIPConfig):
            raise TypeError(
                f"TIPTrainer needs a TIPConfig as `args`, got {type(args).__name__}; build TIPConfig(**your_gkd_args)."
            )
        if selector is not None and not callable(selector):
            raise TypeError(f"selector must be callable (signals, context) -> Tensor, got {type(selector).__name__}.")
        if data_collator is None:
            _check_chat_columns(train_dataset, "train_dataset")
            _check_chat_columns(eval_dataset, "eval_dataset")
        model, teacher_model = self._load_models(
            model, teacher_model, args, peft_config, quantization_config, teacher_quantization_config
        )
        # The models are instantiated now: GKD/SFT must not see the init kwargs again (they would warn or raise).
        init_kwargs = (args.model_init_kwargs, args.teacher_model_init_kwargs)
        args.model_init_kwargs = args.teacher_model_init_kwargs = None
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
        self.selector: TokenSelector = selector if selector is not None else build_selector(args)
        self.selector_requires = frozenset(getattr(self.selector, "requires", ()))
        unknown = sorted(self.selector_requires - set(self.EXTRA_SIGNALS))
        if unknown:
            raise ValueError(
                f"selector {self.selector!r} requires unknown extra signals {unknown}; allowed values: "
                f"{', '.join(self.EXTRA_SIGNALS)}."
            )
        self.sstoken_history: ModelHistory | None = None
        if any(name.startswith("history_") for name in self.selector_requires):
            self.sstoken_history = self._build_history(args)
        self.tip_statistics = TIPStatistics(self.accelerator.device)
        self._tip_last_logged_step = 0
        self._tip_micro_step = (-1, 0)
        self._supports_logits_to_keep: dict[int, bool] = {}
        self._tip_rng_pending: str | None = None
        self._tip_rng_restored: str | None = None

    def _build_history(self, args: TIPConfig) -> ModelHistory:
        """The ssToken history model of the student, and the callback that updates it when it is an EMA."""

        def option(name: str):
            value = getattr(args, name)
            return SSTOKEN_DEFAULTS[name] if value is None else value

        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if self.is_fsdp_enabled or is_deepspeed_zero3_enabled():
            raise ValueError(
                "The ssToken history model swaps whole parameters into the student, which FSDP and DeepSpeed ZeRO-3 "
                "shard; use DDP or ZeRO-1/2, or a selector without a history model (sstoken_gamma=0)."
            )

        history = ModelHistory(
            self.model,
            decay=option("sstoken_ema_decay"),
            mode=option("sstoken_history"),
            device=option("sstoken_history_device"),
        )
        if history.mode == "ema":
            self.add_callback(HistoryEMACallback(history, option("sstoken_ema_update_interval")))
        logger.info(f"ssToken history model: {history!r}, {history.nbytes / 2**20:.1f} MiB.")
        return history

    # ------------------------------------------------------------------ models

    @staticmethod
    def _load_models(model, teacher_model, args, peft_config, quantization_config, teacher_quantization_config):
        """Loads a student / teacher given as id or path, checks and prepares a quantized student (QLoRA)."""
        if isinstance(model, str):
            init_kwargs = dict(args.model_init_kwargs or {})
            if peft_config is None and (
                init_kwargs_are_quantized(init_kwargs)
                or init_kwargs_are_quantized({"quantization_config": quantization_config})
            ):
                raise ValueError(
                    f"The student {model!r} is to be loaded in 4 or 8 bits, and a quantized model cannot be fully "
                    "fine-tuned (its quantized weights get no gradients). Pass a peft_config (e.g. "
                    "peft.LoraConfig(target_modules='all-linear'), or --use_peft in the CLI), or load it unquantized."
                )
            model = load_causal_lm(model, init_kwargs, quantization_config, args.trust_remote_code, role="student")
        elif quantization_config is not None or args.model_init_kwargs is not None:
            raise ValueError(
                "quantization_config and args.model_init_kwargs apply to a student given as a model id or path; the "
                "student is already instantiated. Load it with the options you want, or pass its id or path."
            )
        if model is not None:
            model = prepare_quantized_student(
                model, peft_config, args.gradient_checkpointing, args.gradient_checkpointing_kwargs
            )
        if teacher_model is None:
            teacher_model = args.teacher_model_name_or_path
        if isinstance(teacher_model, str):
            teacher_model = load_causal_lm(
                teacher_model,
                args.teacher_model_init_kwargs,
                teacher_quantization_config,
                args.trust_remote_code,
                role="teacher",
            )
        elif teacher_quantization_config is not None or args.teacher_model_init_kwargs is not None:
            raise ValueError(
                "teacher_quantization_config and args.teacher_model_init_kwargs apply to a teacher given as a model id "
                "or path; the teacher is already instantiated."
            )
        if teacher_model is None:
            raise ValueError("TIPTrainer needs a teacher: pass teacher_model or set args.teacher_model_name_or_path.")
        return model, teacher_model

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
        if self._tip_rng_pending is not None:
            # Resuming mid-epoch, `Trainer` restores the RNG only after this method returns (the skipped batches
            # must not shift the shuffle); generation happens here, so restore it now and skip the later reload.
            super()._load_rng_state(self._tip_rng_pending)
            self._tip_rng_restored, self._tip_rng_pending = self._tip_rng_pending, None
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

    def _thresholds(self, signals: TokenSignals) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """Entropy and divergence splits of the quadrants: fixed, or quantiles over every process's tokens.

        Quantile thresholds are 0-dim tensors on the training device, so that nothing here waits for the GPU.
        """
        args = self.args
        if args.entropy_threshold is not None:
            return float(args.entropy_threshold), float(args.divergence_threshold)
        nan = torch.full_like(signals.entropy, float("nan"))
        values = torch.stack(
            [torch.where(signals.finite, signals.entropy, nan), torch.where(signals.finite, signals.divergence, nan)],
            dim=1,
        )
        both = self._gather_rows(values).float()
        if both.size(0) == 0:
            return 0.0, 0.0
        # Non-finite positions are NaN and ignored; with no finite position at all the split is 0.
        entropy_threshold = torch.nanquantile(both[:, 0], args.entropy_threshold_quantile).nan_to_num(0.0)
        divergence_threshold = torch.nanquantile(both[:, 1], args.divergence_threshold_quantile).nan_to_num(0.0)
        return entropy_threshold, divergence_threshold

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

    def select_tokens(
        self, signals: TokenSignals, extras: dict[str, torch.Tensor] | None = None, training: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
        """Runs thresholds, quadrants and the selection rule on the signals of one micro-batch.

        Args:
            signals ([`TokenSignals`]): Signals of the eligible positions.
            extras (`dict[str, torch.Tensor]`, *optional*): Extra per-token inputs the selector `requires`.
            training (`bool`, *optional*, defaults to `True`): Whether this is a training micro-batch.

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
            extras=extras or {},
            training=training,
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

        targets = shifted_labels[seq_idx, pos_idx]
        requires = self.selector_requires
        # The teacher (and the history model, if asked) run first, so that no student graph is alive while the
        # history weights are swapped into the student.
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_hidden = self._final_hidden(self.teacher_model, inputs)
        # Causal shift: the hidden state at position i predicts the label at i + 1.
        teacher_hidden = teacher_hidden[:, :-1][seq_idx, pos_idx]
        teacher_head = OutputHead.from_model(_causal_lm(self.teacher_model))
        extras: dict[str, torch.Tensor] = {}
        history_kinds = tuple(name[len("history_") :] for name in sorted(requires) if name.startswith("history_"))
        if history_kinds:
            extras.update(self._history_signals(inputs, seq_idx, pos_idx, targets, teacher_hidden, history_kinds))

        capture = capture_last_attention_inputs(_causal_lm(model)) if PROMPT_ATTENTION in requires else nullcontext()
        with capture as attention_inputs:
            student_hidden = self._final_hidden(model, inputs)
        hidden = student_hidden[:, :-1][seq_idx, pos_idx]
        del student_hidden
        if PROMPT_ATTENTION in requires:
            extras[PROMPT_ATTENTION] = self._prompt_attention(inputs, attention_inputs, seq_idx, pos_idx)

        student_head = OutputHead.from_model(_causal_lm(model))
        fused = None
        if type(self.selector) is AllTokens and args.divergence_top_k is None:
            # Every token is kept: read the signals off the loss pass instead of a separate pass over the logits.
            fused = token_jsd_with_signals(
                hidden,
                teacher_hidden,
                student_head,
                teacher_head,
                targets,
                beta=self.beta,
                divergence=args.divergence,
                chunk_size=args.tip_chunk_size,
            )
        if fused is not None:
            loss_sum, values = fused
            signals = TokenSignals(**values, seq_idx=seq_idx, pos_idx=pos_idx)
            weights, quadrant, thresholds = self.select_tokens(signals, extras, training=model.training)
        else:
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
            weights, quadrant, thresholds = self.select_tokens(signals, extras, training=model.training)
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

    def _history_signals(
        self,
        inputs: dict[str, Any],
        seq_idx: torch.Tensor,
        pos_idx: torch.Tensor,
        targets: torch.Tensor,
        teacher_hidden: torch.Tensor,
        kinds: tuple[str, ...],
    ) -> dict[str, torch.Tensor]:
        """Per-token losses of the history model (`history_nll`, `history_divergence`), in eval mode, no grad."""
        if self.sstoken_history is None:
            raise RuntimeError("The selector needs a history model but TIPTrainer built none.")
        student = self.model
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad(), self.sstoken_history.swapped_in(student):
                hidden = self._final_hidden(student, inputs)[:, :-1][seq_idx, pos_idx]
                # The head may be trained (or tied to trained embeddings): project inside the swap.
                losses = history_token_losses(
                    hidden,
                    targets,
                    OutputHead.from_model(_causal_lm(student)),
                    kinds,
                    teacher_hidden=teacher_hidden,
                    teacher_head=OutputHead.from_model(_causal_lm(self.teacher_model)),
                    beta=self.beta,
                    chunk_size=self.args.tip_chunk_size,
                )
        finally:
            student.train(was_training)
        return {f"history_{kind}": value for kind, value in losses.items()}

    def _prompt_attention(
        self, inputs: dict[str, Any], attention_inputs, seq_idx: torch.Tensor, pos_idx: torch.Tensor
    ) -> torch.Tensor:
        """Last-layer attention mass of each completion token on its prompt, averaged over heads.

        The completion token predicted at shifted position `p` sits at position `p + 1`; its attention row is used.
        The prompt of a row is its real (unpadded) tokens before its first labelled one.
        """
        labels, attention_mask = inputs["labels"], inputs["attention_mask"]
        labelled = labels != -100
        seq_len = labels.size(1)
        first = torch.where(
            labelled.any(1), labelled.int().argmax(1), torch.full_like(labelled[:, 0], seq_len, dtype=torch.long)
        )
        positions = torch.arange(seq_len, device=labels.device)
        prompt_mask = attention_mask.bool() & (positions[None, :] < first[:, None])
        return prompt_attention_mass(
            attention_inputs, attention_mask, prompt_mask, seq_idx, pos_idx + 1, chunk_size=self.args.tip_chunk_size
        )

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
        counts = torch.stack([kept_weight, torch.full_like(kept_weight, float(num_eligible))])
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
            if hasattr(self.selector, "compute_metrics"):
                logs.update(self.selector.compute_metrics(reduce_sum))
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
        if self.sstoken_history is not None and self.args.should_save:
            torch.save(self.sstoken_history.state_dict(), os.path.join(output_dir, HISTORY_STATE_NAME))
        path = os.path.join(output_dir, TIP_STATE_NAME.format(rank=self.accelerator.process_index))
        # Written last and atomically: its presence marks the checkpoint complete (see `train`).
        torch.save(self._tip_state(), path + ".tmp")
        os.replace(path + ".tmp", path)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`; with `resume_from_checkpoint=True` it resumes from the newest *complete* checkpoint.

        A run killed while saving leaves a checkpoint folder without its trainer state or TIP state, which `Trainer`
        would pick and fail on; such folders are skipped with a warning. A checkpoint is complete when it holds
        `trainer_state.json` and the TIP state of every rank (written last); if none does (checkpoints written by
        another trainer), the newest holding `trainer_state.json` is used.
        """
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            resume_from_checkpoint = self._last_complete_checkpoint(self.args.output_dir)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def _last_complete_checkpoint(self, output_dir: str) -> str:
        from transformers.trainer import TRAINER_STATE_NAME
        from transformers.trainer_utils import sort_checkpoints

        candidates = sort_checkpoints(output_dir) if os.path.isdir(output_dir) else []
        with_state = [c for c in candidates if os.path.isfile(os.path.join(c, TRAINER_STATE_NAME))]
        ranks = range(self.accelerator.num_processes)
        complete = [
            c for c in with_state if all(os.path.isfile(os.path.join(c, TIP_STATE_NAME.format(rank=r))) for r in ranks)
        ]
        chosen = (complete or with_state or [None])[-1]
        if chosen is None:
            raise ValueError(
                f"No complete checkpoint in {output_dir} to resume from (found {candidates or 'none'}); start without "
                "resume_from_checkpoint or pass the path of a checkpoint."
            )
        skipped = candidates[candidates.index(chosen) + 1 :]
        if skipped:
            logger.warning(
                f"Skipping incomplete checkpoint(s) {skipped} (a run interrupted while saving); resuming from {chosen}."
            )
        return chosen

    def _load_rng_state(self, checkpoint):
        """Restores the RNG of a checkpoint once: before the first on-policy generation of a resumed run."""
        if checkpoint is not None and checkpoint == self._tip_rng_restored:
            self._tip_rng_restored = None  # already restored in `get_batch_samples`, before generating
            return
        self._tip_rng_pending = None
        super()._load_rng_state(checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._tip_rng_pending = resume_from_checkpoint
        if self.sstoken_history is not None:
            history_path = os.path.join(resume_from_checkpoint, HISTORY_STATE_NAME)
            if os.path.isfile(history_path):
                self.sstoken_history.load_state_dict(torch.load(history_path, map_location="cpu", weights_only=True))
            else:
                logger.warning(
                    f"{history_path} is missing: the ssToken history model restarts from the resumed weights, so "
                    "selections differ from an uninterrupted run."
                )
                self.sstoken_history.reset(self.model)
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
