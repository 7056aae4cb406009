"""What both trainer adapters share: the engine's set-up, the forward passes around it, logging and checkpoints.

[`TIPTrainerMixin`] sits before the TRL trainer in the MRO (`class TIPTrainer(TIPTrainerMixin, GKDTrainer)`). An
adapter provides

- `_tip_backbone(unwrapped, view)`: the final hidden states of an unwrapped model on a [`ForwardView`] (a `(B, L, d)`
  tensor whose column `j` is the state at shifted position `view.hidden_offset + j`), without logits;

and calls [`TIPTrainerMixin._tip_loss`] from its loss computation. Everything else — the teacher pass, ssToken's
extra signals, the engine, statistics in the logs, the selection state in checkpoints, observers — is here.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from transformers import is_wandb_available
from transformers.utils import is_peft_available, logging

from .._compat import (
    TRAINER_STATE_NAME,
    ForwardRedirection,
    checkpoint_dir,
    get_comet_experiment_url,
    get_trackio_space_url,
    sort_checkpoints,
)
from ..engine import SelectionRecord, StepTokens, TokenBatch, TokenSelectionEngine
from ..loss import OutputHead
from ..model_card import TIP_PAPER, selector_parts, tip_model_card
from ..selection import TokenSelector, build_selector
from ..selection.context import Processes
from ..signals import history_token_losses
from ..sstoken import (
    PROMPT_ATTENTION,
    SSTOKEN_DEFAULTS,
    HistoryEMACallback,
    ModelHistory,
    SSToken,
    SSTokenWarmupCallback,
)
from ..sstoken.attention import capture_attention_inputs, prompt_attention_mass, self_attention_layer


if is_peft_available():
    from peft import PeftModel


__all__ = [
    "ForwardView",
    "TIPTrainerMixin",
    "backbone_hidden",
    "backbone_of",
    "causal_lm",
    "check_peft_student",
    "default_config",
]

logger = logging.get_logger(__name__)

TIP_STATE_NAME = "tip_state_rank{rank}.pt"
HISTORY_STATE_NAME = "sstoken_history.pt"


def default_config(config_class: type, model: Any, trainer_name: str) -> Any:
    """The config a trainer builds when `args` is None, as TRL's do: every default, `output_dir` named after the model
    (`"{model name}-{trainer_name}"`, e.g. `Qwen3-0.6B-TIP` for `model="Qwen/Qwen3-0.6B"`)."""
    model_id = model if isinstance(model, str) else getattr(getattr(model, "config", None), "name_or_path", None)
    return config_class(output_dir=f"{(model_id or '').split('/')[-1]}-{trainer_name}")


def causal_lm(model: nn.Module) -> nn.Module:
    """The `PreTrainedModel` inside accelerate/DeepSpeed/DDP/FSDP and PEFT wrappers."""
    while hasattr(model, "module") and not hasattr(model, "get_output_embeddings"):
        model = model.module
    if is_peft_available() and isinstance(model, PeftModel):
        model = model.get_base_model()
    return model


def backbone_of(lm: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM, whose output is the final (normed) hidden state fed to `lm_head`."""
    backbone = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    if backbone is None or backbone is lm:
        backbone = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"Cannot find the decoder of {type(lm).__name__}; trl-tip needs a causal LM with lm_head.")
    return backbone


def backbone_hidden(unwrapped: nn.Module, view: ForwardView) -> torch.Tensor:
    """Final hidden states `(B, T - 1, d)` of a causal LM on `view` (the last position predicts nothing trained)."""
    out = backbone_of(causal_lm(unwrapped))(
        input_ids=view.input_ids, attention_mask=view.attention_mask, use_cache=False, **view.model_kwargs
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[:, :-1]


def check_peft_student(model: nn.Module) -> None:
    """Refuses PEFT set-ups the hidden-state loss cannot train correctly (as TRL's `DistillationTrainer` does).

    Prompt-learning methods (prompt tuning, prefix tuning, P-tuning) prepend virtual tokens or key/values inside
    `PeftModel.forward`, which the loss bypasses by running the decoder stack directly: the completion positions it
    reads would be the wrong ones. (An adapter on `lm_head` works with trl-tip's loss, but TRL's trainers refuse it
    before this check.)
    """
    if not (is_peft_available() and isinstance(model, PeftModel)):
        return
    from peft import PromptLearningConfig

    if any(isinstance(cfg, PromptLearningConfig) for cfg in model.peft_config.values()):
        methods = sorted({type(cfg).__name__ for cfg in model.peft_config.values()})
        raise ValueError(
            f"Prompt-learning PEFT methods are not supported (got {', '.join(methods)}): they prepend virtual tokens "
            "inside PeftModel.forward, so the completion positions the token-level loss reads would be shifted. Use "
            "a weight adapter such as LoRA (peft.LoraConfig) instead."
        )


@dataclass
class ForwardView:
    """One micro-batch in the form both adapters produce for [`TIPTrainerMixin._tip_loss`].

    Attributes:
        input_ids: `(B, T)` prompt and completion tokens.
        attention_mask: `(B, T)`, 1 at real tokens.
        loss_mask: `(B, T - 1)` boolean: the hidden state at shifted position `p` is trained to predict token `p + 1`.
        prompt_mask: `(B, T)` boolean: the prompt tokens of each row (for the ssToken attention score).
        hidden_offset: Shifted position of the first column of the hidden states `_tip_backbone` returns.
        model_kwargs: Further inputs of the forward (e.g. multimodal fields), passed to `_tip_backbone`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    prompt_mask: torch.Tensor
    hidden_offset: int = 0
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> torch.Tensor:
        """`input_ids` with `-100` where no loss is taken (GKD's convention), for records and token dumps."""
        labels = torch.full_like(self.input_ids, -100)
        labels[:, 1:] = torch.where(self.loss_mask, self.input_ids[:, 1:], labels[:, 1:])
        return labels


class TIPTrainerMixin:
    """Token selection for a TRL distillation trainer; see the module docstring."""

    # The TRL trainer the adapter extends (its name and `_paper` go into the model card as the base method).
    _tip_base_trainer: type
    # TRL's trainers credit `_paper` as their method; a trl-tip trainer's token selection is TIP's.
    _paper = TIP_PAPER

    # Set by `_init_tip`.
    tip_engine: TokenSelectionEngine
    selector: TokenSelector
    sstoken_history: ModelHistory | None = None

    # ------------------------------------------------------------------ set-up

    def _init_tip(self, args, selector: TokenSelector | None, beta: float, temperature: float = 1.0) -> None:
        """Builds the engine (and ssToken's history model when the rule needs one); call after `Trainer.__init__`."""
        self.selector = selector if selector is not None else build_selector(args)
        self._tip_custom_selector = selector is not None
        if getattr(self, "_forward_redirection", None) is None:
            self._forward_redirection = ForwardRedirection()
        self.tip_engine = TokenSelectionEngine(
            self.selector,
            args,
            beta=beta,
            seed=args.seed,
            processes=Processes(self.accelerator),
            temperature=temperature,
            device=self.accelerator.device,
        )
        # ssToken: the history model (if the selector needs one), the attention layer and the attention-only warm-up.
        self.sstoken_history = None
        if any(name.startswith("history_") for name in self.tip_engine.model_signals):
            self.sstoken_history = self._build_history(args)
        else:
            self.tip_engine.available_model_signals = frozenset({PROMPT_ATTENTION})
        layer = getattr(args, "sstoken_attention_layer", None)
        self._sstoken_attention_layer = SSTOKEN_DEFAULTS["sstoken_attention_layer"] if layer is None else layer
        warmup = None
        if isinstance(self.selector, SSToken) and self.selector.gamma > 0:
            ratio, steps = getattr(args, "sstoken_warmup_ratio", None), getattr(args, "sstoken_warmup_steps", None)
            if steps:
                warmup = SSTokenWarmupCallback(self.selector, warmup_steps=steps)
            elif ratio:
                warmup = SSTokenWarmupCallback(self.selector, warmup_ratio=ratio)
        if PROMPT_ATTENTION in self.tip_engine.model_signals or warmup is not None:
            self_attention_layer(causal_lm(self.accelerator.unwrap_model(self.model)), self._sstoken_attention_layer)
        self._tip_last_logged_step = 0
        # (optimizer step, eligible tokens of each of its rollouts over all processes, micro-batches per process)
        self._tip_step_lengths: tuple[int, torch.Tensor, int] | None = None
        if warmup is not None:
            self.add_callback(warmup)
        self._bind_tip_callbacks()

    def _build_history(self, args) -> ModelHistory:
        """The ssToken history model of the student, and the callback that updates it when it is an EMA.

        `fixed` (default): the student before training, the base model with the adapter disabled for a LoRA student
        whose adapter is still a no-op (no copy), else a frozen copy of the trainable weights; `ema`: an EMA copy.
        """

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
        if history.uses_base_model and "sstoken_history_device" in getattr(args, "_tip_given_options", ()):
            raise ValueError(
                "sstoken_history_device is not used: the history model of this PEFT student is its base model with "
                "the adapter disabled, which copies no weight. Leave sstoken_history_device unset, or use "
                "sstoken_history='ema' (an adapter-sized copy)."
            )
        if history.mode == "ema":
            self.add_callback(HistoryEMACallback(history, option("sstoken_ema_update_interval")))
        logger.info(f"ssToken history model: {history!r}, {history.nbytes / 2**20:.1f} MiB.")
        return history

    def add_callback(self, callback) -> None:
        """`Trainer.add_callback`; a callback with `on_selection(record, engine)` also observes the engine, and one
        with `bind_trainer(trainer)` is given this trainer.

        `Trainer.__init__` calls this method for the `callbacks` argument before the engine exists; those are bound
        once the engine is built.
        """
        super().add_callback(callback)
        self._bind_tip_callbacks()

    def _bind_tip_callbacks(self) -> None:
        engine = getattr(self, "tip_engine", None)
        if engine is None:
            return
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "bind_trainer"):
                callback.bind_trainer(self)
            if hasattr(callback, "bind_engine"):
                callback.bind_engine(engine)
            if hasattr(callback, "on_selection"):
                engine.add_observer(callback)

    # ------------------------------------------------------------------ compatibility views

    @property
    def tip_statistics(self):
        """The engine's [`TIPStatistics`] (Q1–Q4 sums since the last logging step)."""
        return self.tip_engine.statistics

    def select_tokens(
        self, signals, extras: dict[str, torch.Tensor] | None = None, training: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[Any, Any]]:
        """Thresholds, quadrants and the rule on the signals of one micro-batch (see `TokenSelectionEngine.select`)."""
        return self.tip_engine.select(signals, extras, self.state.global_step, training)

    # ------------------------------------------------------------------ the loss of one micro-batch

    def _tip_backbone(self, unwrapped: nn.Module, view: ForwardView) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - provided by each adapter

    def _tip_hidden(
        self, model: nn.Module, view: ForwardView, unwrapped: nn.Module, redirect: bool = False
    ) -> torch.Tensor:
        """Hidden states of `unwrapped` on `view`; with `redirect`, run inside `model`'s forward (its wrapper's, or
        its own module hooks: FSDP2 and DeepSpeed gather the sharded parameters there). The student's pass is already
        inside its forward (the whole loss is); the teacher's is redirected."""
        if redirect:
            return self._forward_redirection(model, unwrapped, self._tip_backbone, unwrapped, view)
        return self._tip_backbone(unwrapped, view)

    def _tip_loss(
        self,
        student: nn.Module,
        teacher: nn.Module,
        view: ForwardView,
        training: bool,
        base_count: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, SelectionRecord]:
        """Teacher, ssToken extras, student, then the engine: the loss of one micro-batch on its kept tokens.

        Call it inside the student's forward (`_forward_redirection`); `student` is the unwrapped student, `teacher`
        the teacher as prepared by the trainer (wrapped or not). `base_count` is the base trainer's divisor of this
        loss with every token kept (see [`StepTokens`]); in training the rollouts of the optimizer step come from
        [`_tip_count_step`].
        """
        if getattr(self, "_tip_reset_history_after_load", False):
            # Resumed from a checkpoint without a saved history: restart it from the resumed weights, which
            # Trainer, DeepSpeed or FSDP have loaded by the first loss.
            self.sstoken_history.reset(self.model)
            self._tip_reset_history_after_load = False
        seq_idx, pos_idx = view.loss_mask.nonzero(as_tuple=True)
        targets = view.input_ids[:, 1:][seq_idx, pos_idx]
        cols = pos_idx - view.hidden_offset
        engine = self.tip_engine
        requires = engine.model_signals
        # The teacher (and the history model, if asked) run first, so that no student graph is alive while the
        # history weights are swapped into the student.
        teacher.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(teacher)
        with torch.no_grad():
            teacher_hidden = self._tip_hidden(teacher, view, unwrapped_teacher, redirect=True)[seq_idx, cols]
        unwrapped_student = self.accelerator.unwrap_model(student)
        teacher_head = OutputHead.from_model(causal_lm(unwrapped_teacher))
        extras: dict[str, torch.Tensor] = {}
        history_kinds = tuple(name[len("history_") :] for name in sorted(requires) if name.startswith("history_"))
        if history_kinds:
            extras.update(
                self._history_signals(student, unwrapped_student, view, seq_idx, cols, targets, teacher_hidden)
            )
        capture = (
            capture_attention_inputs(causal_lm(unwrapped_student), self._sstoken_attention_layer)
            if PROMPT_ATTENTION in requires
            else nullcontext()
        )
        with capture as attention_inputs:
            student_hidden = self._tip_hidden(student, view, unwrapped_student)
        hidden = student_hidden[seq_idx, cols]
        del student_hidden
        if PROMPT_ATTENTION in requires:
            extras[PROMPT_ATTENTION] = prompt_attention_mass(
                attention_inputs,
                view.attention_mask,
                view.prompt_mask,
                seq_idx,
                pos_idx + 1,
                chunk_size=self.args.tip_chunk_size,
            )
        batch = TokenBatch(
            student_hidden=hidden,
            teacher_hidden=teacher_hidden,
            student_head=OutputHead.from_model(causal_lm(unwrapped_student)),
            teacher_head=teacher_head,
            targets=targets,
            seq_idx=seq_idx,
            pos_idx=pos_idx,
            extras=extras,
            input_ids=view.input_ids,
            attention_mask=view.attention_mask,
            labels=view.labels,
        )
        step = StepTokens(base_count=base_count)
        if training and self._tip_step_lengths is not None and self._tip_step_lengths[0] == self.state.global_step:
            _, lengths, micro_batches = self._tip_step_lengths
            step = StepTokens(base_count=base_count, rollout_lengths=lengths, micro_batches=micro_batches)
        return engine.compute(batch, global_step=self.state.global_step, training=training, step=step)

    def _tip_count_step(self, loss_masks: list[torch.Tensor], micro_batches: int | None = None) -> torch.Tensor:
        """Records the rollouts of the optimizer step about to be trained, before any forward; returns their count.

        Call it once per optimizer step, on every process, with the loss masks (`(B, L)`, 1 where a token is trained
        on) of all the step's rows on this process, and the number of micro-batches they will be trained in (the
        number of masks if `None`). The eligible tokens of every rollout over all processes are what the loss of each
        micro-batch of the step is normalised by ([`TokenSelectionEngine.loss_denominator`]).

        Returns:
            `torch.Tensor`: The step's eligible tokens over all processes (0-dim long).
        """
        device = self.accelerator.device
        rows = [mask.reshape(mask.size(0), -1).ne(0).sum(1) for mask in loss_masks]
        lengths = torch.cat(rows).to(device) if rows else torch.zeros(0, dtype=torch.long, device=device)
        lengths = self.tip_engine.processes.gather_rows(lengths)
        self._tip_step_lengths = (
            self.state.global_step,
            lengths,
            len(loss_masks) if micro_batches is None else micro_batches,
        )
        return lengths.sum()

    def _history_signals(
        self,
        student: nn.Module,
        unwrapped_student: nn.Module,
        view: ForwardView,
        seq_idx: torch.Tensor,
        cols: torch.Tensor,
        targets: torch.Tensor,
        teacher_hidden: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Per-token losses of the history model (`history_nll`, `history_divergence`), in eval mode, no grad."""
        if self.sstoken_history is None:
            raise RuntimeError("The selector needs a history model but the trainer built none.")
        kinds = tuple(
            name[len("history_") :] for name in sorted(self.tip_engine.model_signals) if name.startswith("history_")
        )
        was_training = unwrapped_student.training
        unwrapped_student.eval()
        try:
            with torch.no_grad(), self.sstoken_history.swapped_in(self.model):
                hidden = self._tip_hidden(unwrapped_student, view, unwrapped_student)[seq_idx, cols]
                # The head may be trained (or tied to trained embeddings): project inside the swap.
                losses = history_token_losses(
                    hidden,
                    targets,
                    OutputHead.from_model(causal_lm(unwrapped_student)),
                    kinds,
                    teacher_hidden=teacher_hidden,
                    teacher_head=OutputHead.from_model(causal_lm(self.accelerator.unwrap_model(self.teacher_model))),
                    beta=self.tip_engine.beta,
                    chunk_size=self.args.tip_chunk_size,
                    temperature=self.tip_engine.temperature,
                )
        finally:
            unwrapped_student.train(was_training)
        return {f"history_{kind}": value for kind, value in losses.items()}

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the `tip/...` statistics accumulated since the last logging step to the training logs."""
        if "loss" in logs:
            num_steps = self.state.global_step - self._tip_last_logged_step
            metrics = self.tip_engine.log_metrics(num_steps)
            if metrics:
                logs.update(metrics)
                self._tip_last_logged_step = self.state.global_step
        super().log(logs, start_time)

    def evaluate(self, *args, **kwargs):
        """`Trainer.evaluate`; the selection of each evaluation batch is seeded by its index within the evaluation,
        so evaluating the same model on the same data selects the same tokens."""
        self.tip_engine.start_evaluation()
        return super().evaluate(*args, **kwargs)

    # ------------------------------------------------------------------ model card

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ) -> None:
        """Writes `README.md` in `output_dir` as TRL's trainers do, crediting TIP for the token selection, ssToken when
        its rule is used and the base trainer's paper (GKD's) as that trainer's method (see `trl_tip.model_card`)."""
        if not self.is_world_process_zero():
            return
        model_id = getattr(self.model.config, "name_or_path", None)
        base_model = model_id if model_id and not os.path.isdir(model_id) else None
        tags = set() if tags is None else {tags} if isinstance(tags, str) else set(tags)
        if hasattr(self.model.config, "unsloth_version"):
            tags.add("unsloth")
        if "JOB_ID" in os.environ:
            tags.add("hf_jobs")
        tags.update(self._tag_names)
        trackio_url = get_trackio_space_url()
        if trackio_url is not None:
            tags = {tag for tag in tags if not tag.startswith("trackio:")} | {f"trackio:{trackio_url}"}
        wandb_url = None
        if is_wandb_available():
            import wandb

            wandb_url = wandb.run.url if wandb.run is not None else None
        if self._tip_custom_selector:
            selection = f"a custom selector ({type(self.selector).__name__})"
        else:
            selection = f'token_selection="{self.args.token_selection}"'
            if getattr(self.args, "keep_ratio", None) is not None:
                selection += f", keep_ratio={self.args.keep_ratio}"
        uses_sstoken = self.args.token_selection == "sstoken" or any(
            isinstance(part, SSToken) for part in selector_parts(self.selector)
        )
        card = tip_model_card(
            base_model=base_model,
            model_name=model_name,
            hub_model_id=self.hub_model_id,
            dataset_name=dataset_name,
            tags=sorted(tags),
            trainer_name=type(self).__name__,
            base_trainer=self._tip_base_trainer.__name__,
            base_paper=self._tip_base_trainer._paper,
            selection=selection,
            uses_sstoken=uses_sstoken,
            wandb_url=wandb_url,
            trackio_url=trackio_url,
            comet_url=get_comet_experiment_url(),
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))

    # ------------------------------------------------------------------ checkpoints

    def _tip_state(self) -> dict[str, Any]:
        return {**self.tip_engine.state_dict(), "last_logged_step": self._tip_last_logged_step}

    def _save_checkpoint(self, model, trial):
        """`Trainer._save_checkpoint`, with the selection state (and the ssToken history) written into the new
        checkpoint first: `Trainer` deletes old checkpoints (`save_total_limit`) at the end of its save, so a run
        killed there still leaves a complete newest checkpoint. Complete = `trainer_state.json` (written by `Trainer`
        after the weights and optimizer) and every rank's TIP state (see `train`)."""
        output_dir = checkpoint_dir(self, trial)
        os.makedirs(output_dir, exist_ok=True)
        if self.sstoken_history is not None and self.args.should_save:
            torch.save(self.sstoken_history.state_dict(), os.path.join(output_dir, HISTORY_STATE_NAME))
        path = os.path.join(output_dir, TIP_STATE_NAME.format(rank=self.accelerator.process_index))
        torch.save(self._tip_state(), path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: present means whole
        if self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()  # every rank's state is written before rank 0 rotates
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`; with `resume_from_checkpoint=True` it resumes from the newest *complete* checkpoint.

        A run killed while saving leaves a checkpoint folder without its trainer state or TIP state, which `Trainer`
        would pick and fail on; such folders are skipped with a warning. A checkpoint is complete when it holds
        `trainer_state.json` (written after the weights and optimizer) and the TIP state of every rank (written before
        `Trainer` saves anything, so before it deletes old checkpoints); if none does (checkpoints written by
        another trainer), the newest holding `trainer_state.json` is used. The selection state (statistics, selector,
        ssToken history) is restored here, before `Trainer.train`, whatever loads the model weights (`Trainer`
        itself, DeepSpeed or FSDP).
        """
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            resume_from_checkpoint = self._last_complete_checkpoint(self.args.output_dir)
        if isinstance(resume_from_checkpoint, str):
            self._load_tip_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def _last_complete_checkpoint(self, output_dir: str) -> str:
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

    def _load_tip_state(self, checkpoint: str) -> None:
        """Restores the engine's state and the ssToken history saved with `checkpoint` (warns if missing)."""
        if self.sstoken_history is not None:
            history_path = os.path.join(checkpoint, HISTORY_STATE_NAME)
            if os.path.isfile(history_path):
                self.sstoken_history.load_state_dict(torch.load(history_path, map_location="cpu", weights_only=True))
            else:
                logger.warning(
                    f"{history_path} is missing: an EMA ssToken history restarts from the resumed weights (selections "
                    "differ from an uninterrupted run); a fixed one keeps the weights this trainer was built with."
                )
                self._tip_reset_history_after_load = True
        path = os.path.join(checkpoint, TIP_STATE_NAME.format(rank=self.accelerator.process_index))
        if not os.path.isfile(path):
            logger.warning(
                f"{path} is missing ({checkpoint} was not written by a trl-tip trainer with this number of "
                "processes, or by a trl-tip version that wrote its state after the checkpoint rotation and was "
                "interrupted in between): the token statistics start empty and a stateful selector starts fresh."
            )
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.tip_engine.load_state_dict(state)
        self._tip_last_logged_step = int(state["last_logged_step"])
