"""What both trainer adapters share: the engine's set-up, the forward passes around it, the signal providers, logging.

[`TIPTrainerMixin`] sits before the TRL trainer in the MRO (`class TIPTrainer(TIPTrainerMixin, GKDTrainer)`). An
adapter provides

- `_tip_backbone(unwrapped, view)`: the final hidden states of an unwrapped model on a [`ForwardView`] (a `(B, L, d)`
  tensor whose column `j` is the state at shifted position `view.hidden_offset + j`), without logits;

and calls [`TIPTrainerMixin._tip_loss`] from its loss computation. Everything else — the teacher pass, the signal
providers of the selector's per-token inputs (`trl_tip.plugins`), the engine, statistics in the logs, observers — is
here; the selection state in checkpoints is in `checkpoint.py`, the model card in `trl_tip.model_card`.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .._compat import ForwardRedirection
from ..engine import SelectionRecord, StepTokens, TokenBatch, TokenSelectionEngine
from ..loss import OutputHead
from ..model_card import TIP_PAPER, write_model_card
from ..plugins import PROVIDERS, ProviderBatch, SignalProvider
from ..selection import TokenSelector, build_selector
from ..selection.context import Processes
from .backbone import causal_lm, place_teacher
from .checkpoint import TIPCheckpointMixin


__all__ = ["ForwardView", "TIPTrainerMixin", "default_config"]


def default_config(config_class: type, model: Any, trainer_name: str) -> Any:
    """The config a trainer builds when `args` is None, as TRL's do: every default, `output_dir` named after the model
    (`"{model name}-{trainer_name}"`, e.g. `Qwen3-0.6B-TIP` for `model="Qwen/Qwen3-0.6B"`)."""
    model_id = model if isinstance(model, str) else getattr(getattr(model, "config", None), "name_or_path", None)
    return config_class(output_dir=f"{(model_id or '').split('/')[-1]}-{trainer_name}")


@dataclass
class ForwardView:
    """One micro-batch in the form both adapters produce for [`TIPTrainerMixin._tip_loss`].

    Attributes:
        input_ids: `(B, T)` prompt and completion tokens.
        attention_mask: `(B, T)`, 1 at real tokens.
        loss_mask: `(B, T - 1)` boolean: the hidden state at shifted position `p` is trained to predict token `p + 1`.
        prompt_mask: `(B, T)` boolean: the prompt tokens of each row (e.g. for a prompt-attention signal).
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


class TIPTrainerMixin(TIPCheckpointMixin):
    """Token selection for a TRL distillation trainer; see the module docstring."""

    # The TRL trainer the adapter extends (its name and `_paper` go into the model card as the base method).
    _tip_base_trainer: type
    # TRL's trainers credit `_paper` as their method; a trl-tip trainer's token selection is TIP's.
    _paper = TIP_PAPER

    # Set by `_init_tip`.
    tip_engine: TokenSelectionEngine
    selector: TokenSelector
    # Signal name -> the provider computing it (one provider may compute several signals).
    tip_providers: dict[str, SignalProvider]

    # ------------------------------------------------------------------ set-up

    def _init_tip(self, args, selector: TokenSelector | None, beta: float, temperature: float = 1.0) -> None:
        """Builds the engine and the signal providers its selector requires; call after `Trainer.__init__`."""
        place_teacher(getattr(self, "teacher_model", None), self.accelerator)
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
        self._tip_last_logged_step = 0
        # (optimizer step, eligible tokens of each of its rollouts over all processes, micro-batches per process)
        self._tip_step_lengths: tuple[int, torch.Tensor, int] | None = None
        self.tip_providers = {}
        for name in sorted(self.tip_engine.provider_requires):
            self._tip_provider(name)
        # A later selector (a schedule phase) may require only what a built or on-demand provider computes.
        on_demand = {name for name, cls in PROVIDERS.items() if cls.build_on_demand}
        self.tip_engine.provided_signals = frozenset(self.tip_providers) | on_demand
        self._bind_tip_callbacks()

    def _tip_provider(self, name: str) -> SignalProvider:
        """The provider of signal `name`, built (once, for all its signals) on first use."""
        if name not in self.tip_providers:
            provider = PROVIDERS[name](self, self.args)
            self.tip_providers.update(dict.fromkeys(type(provider).provides, provider))
        return self.tip_providers[name]

    def _tip_provider_list(self) -> list[SignalProvider]:
        """Each built provider once, in the order they were built."""
        return list({id(p): p for p in getattr(self, "tip_providers", {}).values()}.values())

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
        """Teacher, signal providers, student, then the engine: the loss of one micro-batch on its kept tokens.

        Call it inside the student's forward (`_forward_redirection`); `student` is the unwrapped student, `teacher`
        the teacher as prepared by the trainer (wrapped or not). `base_count` is the base trainer's divisor of this
        loss with every token kept (see [`StepTokens`]); in training the rollouts of the optimizer step come from
        [`_tip_count_step`].
        """
        seq_idx, pos_idx = view.loss_mask.nonzero(as_tuple=True)
        targets = view.input_ids[:, 1:][seq_idx, pos_idx]
        cols = pos_idx - view.hidden_offset
        engine = self.tip_engine
        # The teacher (and the providers' own forwards, e.g. a history model) run first, so that no student graph is
        # alive while a provider swaps weights into the student.
        teacher.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(teacher)
        with torch.no_grad():
            teacher_hidden = self._tip_hidden(teacher, view, unwrapped_teacher, redirect=True)[seq_idx, cols]
        unwrapped_student = self.accelerator.unwrap_model(student)
        teacher_head = OutputHead.from_model(causal_lm(unwrapped_teacher), teacher_hidden.dtype)
        for name in sorted(engine.provider_requires):
            self._tip_provider(name)  # a stateless provider a later selector needs is built on first use
        inputs = ProviderBatch(
            requires=engine.requires,
            view=view,
            seq_idx=seq_idx,
            pos_idx=pos_idx,
            targets=targets,
            model=self.model,
            student=unwrapped_student,
            hidden=self._tip_backbone,
            student_head=lambda: OutputHead.from_model(causal_lm(unwrapped_student)),
            teacher_hidden=teacher_hidden,
            teacher_head=teacher_head,
            beta=engine.beta,
            temperature=engine.temperature,
            chunk_size=self.args.tip_chunk_size,
        )
        providers = self._tip_provider_list()
        extras: dict[str, torch.Tensor] = {}
        for provider in providers:
            extras.update(provider.before_student(inputs))
        with ExitStack() as stack:
            during = [stack.enter_context(provider.around_student(inputs)) for provider in providers]
            student_hidden = self._tip_hidden(student, view, unwrapped_student)
            hidden = student_hidden[seq_idx, cols]
            del student_hidden
        for values in during:
            extras.update(values)
        batch = TokenBatch(
            student_hidden=hidden,
            teacher_hidden=teacher_hidden,
            student_head=OutputHead.from_model(causal_lm(unwrapped_student), hidden.dtype),
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

    # ------------------------------------------------------------------ logging, evaluation, model card

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

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ) -> None:
        """Writes `README.md` in `output_dir` as TRL's trainers do, crediting TIP for the token selection, the papers
        of the selector's rules and the base trainer's paper (GKD's) as that trainer's method (see
        `trl_tip.model_card`)."""
        write_model_card(self, model_name, dataset_name, tags)
