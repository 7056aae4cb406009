"""`TokenSelectionEngine`: the trainer-agnostic core of trl-tip.

One call per micro-batch: final hidden states and output heads of student and teacher at the eligible positions go
in; the distillation loss on the kept tokens (divided by the step's one denominator, see
[`TokenSelectionEngine.loss_denominator`]) and a [`SelectionRecord`] come out. In between, chunk by chunk and without grad, the per-token signals; the quadrant split and the rule's selection
(`trl_tip.selection`); the loss recomputed with grad on the kept positions only (`trl_tip.loss`); the Q1–Q4 statistics
(`trl_tip.stats`). The engine knows nothing of GKD or of `DistillationTrainer`: the trainer adapters in
`trl_tip.trainers` run the models and hand it tensors. It owns its checkpoint state (statistics, the selector's state,
the micro-batch counter that seeds sampling).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from transformers.utils import logging

from .loss import OutputHead, SignalPlan, chunked_pass, gathered_heads
from .plugins import PROVIDERS, provided_signals
from .selection import TokenSelector, assign_quadrants, planned_kept, validate_selection
from .selection.base import LOGIT_SIGNAL_NAMES, reads_teacher_signals
from .selection.context import Processes, QuadrantSplit, build_context, quadrant_thresholds, selection_seed
from .signals import DIVERGENCES, SIGNAL_NAMES, STUDENT_SIGNALS, TokenSignals
from .stats import TIPStatistics


__all__ = [
    "SelectionObserver",
    "SelectionRecord",
    "StepTokens",
    "TokenBatch",
    "TokenSelectionEngine",
]

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class StepTokens:
    """What the adapter counts before any forward to normalise a loss (see [`TokenSelectionEngine.loss_denominator`]).

    Attributes:
        base_count: The base trainer's divisor of the loss with every token kept. Training: the eligible tokens of the
            optimizer step over all processes divided by the number of processes (`DistillationTrainer`'s
            `num_items_in_batch`); evaluation: the trainer's count of the batch. `None`: the rollouts' eligible tokens
            (divided by the processes in training).
        rollout_lengths: Eligible tokens of each rollout the loss is normalised over. Training: every rollout of the
            optimizer step on every process, in any order. `None`: the micro-batch's own rollouts (over all processes
            in training), which makes a budgeted rule's loss depend on how the step is split.
        micro_batches: With `rollout_lengths`, training: the micro-batches of the step on each process (the same on
            every process); after the last one the step's checks run (one collective per step).
    """

    base_count: torch.Tensor | float | None = None
    rollout_lengths: torch.Tensor | None = None
    micro_batches: int = 1


@dataclass
class TokenBatch:
    """One micro-batch as the engine sees it: the eligible positions, flattened.

    Attributes:
        student_hidden: Student final hidden states `(N, d)`, with grad.
        teacher_hidden: Teacher final hidden states `(N, d_t)`.
        student_head: The student's output head.
        teacher_head: The teacher's output head.
        targets: The token each position predicts, `(N,)`.
        seq_idx: Row of each position, `(N,)`.
        pos_idx: Position in the row of the hidden state (it predicts the token at `pos_idx + 1` of `input_ids`).
        extras: Per-token inputs the selector requires that signal providers compute (`trl_tip.plugins`), by name.
        input_ids: `(B, T)` token ids of the micro-batch (prompt and completion), for records.
        attention_mask: `(B, T)`.
        labels: `(B, T)` with `-100` at positions not trained on (prompt, padding, tool output).
    """

    student_hidden: torch.Tensor
    teacher_hidden: torch.Tensor
    student_head: OutputHead
    teacher_head: OutputHead
    targets: torch.Tensor
    seq_idx: torch.Tensor
    pos_idx: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None


@dataclass
class SelectionRecord:
    """What the engine did on one micro-batch, handed to every observer (detached tensors).

    Attributes:
        global_step: Optimizer steps completed before this micro-batch (`trainer.state.global_step`).
        micro_step: Index of the micro-batch within its optimizer step (or within the evaluation).
        training: Whether it was a training micro-batch.
        signals: The per-token signals of the eligible positions.
        quadrant: Quadrant (1–4, 0 for a non-finite position) of each position.
        weights: Selection weight of each position (0 = dropped).
        entropy_threshold: Entropy split of the quadrants.
        divergence_threshold: Divergence split of the quadrants.
        loss: The micro-batch's loss as returned to the trainer.
        input_ids: `(B, T)`, or `None` if the adapter gave none.
        attention_mask: `(B, T)`, or `None`.
        labels: `(B, T)`, or `None`.
        extras: The extra per-token inputs the selector received.
    """

    global_step: int
    micro_step: int
    training: bool
    signals: TokenSignals
    quadrant: torch.Tensor
    weights: torch.Tensor
    entropy_threshold: float | torch.Tensor
    divergence_threshold: float | torch.Tensor
    loss: torch.Tensor
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kept(self) -> torch.Tensor:
        """Boolean keep-mask of the eligible positions."""
        return self.weights > 0


@runtime_checkable
class SelectionObserver(Protocol):
    """Anything with `on_selection(record, engine)`: called after every micro-batch the engine computes.

    `TIPTrainer` and `TIPDistillationTrainer` register every callback that has this method (passed in `callbacks=`
    or added with `add_callback`) as an observer of their engine; see `trl_tip.callbacks.SelectionCallback`.
    """

    def on_selection(self, record: SelectionRecord, engine: TokenSelectionEngine) -> None: ...


class TokenSelectionEngine:
    """Signals → selection → loss on kept tokens → statistics, for one micro-batch at a time.

    Args:
        selector ([`TokenSelector`]): The selection rule.
        args ([`TIPArguments`]): The token-selection options (divergence axis, quadrant split, chunk size).
        beta (`float`): `beta` of the generalized JSD training loss (`0`: forward KL, `1`: reverse KL).
        seed (`int`): Run seed; sampling rules draw from a generator seeded by it, the step, the micro-batch and the
            rank.
        processes ([`Processes`], *optional*): Collectives over the run's processes (one process if `None`).
        temperature (`float`, *optional*, defaults to `1.0`): Temperature of the loss (both distributions divided by
            it; `DistillationTrainer` applies its sampling temperature, `GKDTrainer` 1). The signals are taken at
            temperature 1.
        device (`torch.device`, *optional*): Device of the statistics.
    """

    def __init__(
        self,
        selector: TokenSelector,
        args,
        beta: float,
        seed: int,
        processes: Processes | None = None,
        temperature: float = 1.0,
        device: torch.device | str = "cpu",
    ):
        # The provider-computed signals (`trl_tip.plugins`) a selector may require: every registered one, until the
        # trainer narrows it to those it built or can build on demand.
        self.provided_signals = provided_signals()
        self.set_selector(selector)
        self.split = QuadrantSplit.from_args(args)
        self.divergence = args.divergence
        self.divergence_top_k = args.divergence_top_k
        self.chunk_size = args.tip_chunk_size
        self.teacher_signals = getattr(args, "teacher_signals", "all")
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.seed = int(seed)
        self.processes = processes or Processes()
        self.statistics = TIPStatistics(device)
        self.observers: list[SelectionObserver] = []
        self._micro = (-1, 0)  # (optimizer step, micro-batch index within it)
        self._eval_micro = 0
        self._step_counts: tuple[int, torch.Tensor] | None = None  # the step's eligible, finite, kept tokens so far
        self._warned_empty_step = False

    # ------------------------------------------------------------------ the rule

    def set_selector(self, selector: TokenSelector) -> None:
        """Uses `selector` from the next micro-batch on (e.g. from a [`SelectionScheduleCallback`]).

        Raises:
            TypeError: if it is not callable.
            ValueError: if it requires signals that are unknown or that this trainer cannot compute.
        """
        if not callable(selector):
            raise TypeError(f"selector must be callable (signals, context) -> Tensor, got {type(selector).__name__}.")
        requires = frozenset(getattr(selector, "requires", ()))
        allowed = tuple(dict.fromkeys((*sorted(LOGIT_SIGNAL_NAMES), *sorted(PROVIDERS))))
        unknown = sorted(requires - set(allowed))
        if unknown:
            raise ValueError(
                f"selector {selector!r} requires unknown extra signals {unknown}; allowed values: {', '.join(allowed)}."
            )
        unavailable = sorted((requires & PROVIDERS.keys()) - self.provided_signals)
        if unavailable:
            hints = dict.fromkeys(PROVIDERS[name].unavailable_hint for name in unavailable)
            raise ValueError(
                f"selector {selector!r} requires {unavailable}, which this trainer cannot compute ({'; '.join(hints)})."
            )
        self.selector = selector
        self.requires = requires

    # ------------------------------------------------------------------ what the adapter must provide

    @property
    def provider_requires(self) -> frozenset[str]:
        """The signals the selector requires that signal providers compute (`trl_tip.plugins`), passed in
        `TokenBatch.extras`."""
        return self.requires & PROVIDERS.keys()

    @property
    def signal_plan(self) -> SignalPlan:
        """The per-token signals of the logits the chunked pass computes: the axes, and the further divergences the
        selector requires (passed to it in `context.extras`)."""
        divergences = tuple(name for name in DIVERGENCES if name in self.requires and name not in SIGNAL_NAMES)
        # teacher_signals="kept" and a rule that reads no teacher signal: the teacher's head runs on the kept tokens
        # only (in the loss pass); a rule that keeps every token takes its loss in the signals pass anyway.
        student_only = self.teacher_signals == "kept" and not self.keeps_every_token
        student_only = student_only and not reads_teacher_signals(self.selector)
        return SignalPlan(self.divergence, self.divergence_top_k, divergences, teacher=not student_only)

    @property
    def keeps_every_token(self) -> bool:
        """Whether the selector declares (`keeps_every_token = True`) that it keeps every finite token with weight 1:
        its kept set is known before the signals, so the loss is taken in the signals pass."""
        return bool(getattr(self.selector, "keeps_every_token", False))

    def add_observer(self, observer: SelectionObserver) -> None:
        """Registers `observer` (once) to receive a [`SelectionRecord`] after every micro-batch."""
        if not any(o is observer for o in self.observers):
            self.observers.append(observer)

    # ------------------------------------------------------------------ selection

    def generator(self, global_step: int, training: bool) -> torch.Generator:
        """The CPU generator of the next micro-batch, seeded from the run seed, the optimizer step, the micro-batch
        and the rank. Evaluation batches count from 0 within each evaluation ([`start_evaluation`]), so an
        evaluation of the same model on the same data selects the same tokens."""
        if training:
            last_step, micro = self._micro
            micro = micro + 1 if global_step == last_step else 0
            self._micro = (global_step, micro)
        else:
            micro = self._eval_micro
            self._eval_micro += 1
        seed = selection_seed(self.seed, global_step, micro, self.processes.process_index, evaluation=not training)
        return torch.Generator().manual_seed(seed)

    def start_evaluation(self) -> None:
        """Restarts the evaluation batch counter (call at the start of each evaluation)."""
        self._eval_micro = 0

    @property
    def micro_step(self) -> int:
        """Index, within its optimizer step, of the last training micro-batch selected."""
        return self._micro[1]

    def select(
        self,
        signals: TokenSignals,
        extras: dict[str, torch.Tensor] | None = None,
        global_step: int = 0,
        training: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[Any, Any]]:
        """Thresholds, quadrants and the selection rule on the signals of one micro-batch.

        Returns:
            `tuple`: Weights of shape `(N,)` (0 = dropped; non-finite positions always 0), quadrant ids of shape
            `(N,)` (0 for non-finite positions), and the `(entropy_threshold, divergence_threshold)` pair.
        """
        context = build_context(
            signals,
            self.split,
            self.processes,
            self.generator(global_step, training),
            global_step,
            extras=extras,
            training=training,
        )
        if self.keeps_every_token:
            # Declared: every finite token, weight 1 (the loss already taken in the signals pass is that of these).
            weights = signals.finite.float()
        else:
            selection = self.selector(signals, context)
            weights = validate_selection(selection, len(signals), name=f"selector {self.selector!r}")
            weights = torch.where(signals.finite, weights.to(signals.entropy.device), torch.zeros_like(weights))
        return weights, context.quadrant, (context.entropy_threshold, context.divergence_threshold)

    # ------------------------------------------------------------------ one micro-batch

    def compute(
        self, batch: TokenBatch, global_step: int, training: bool, step: StepTokens | None = None
    ) -> tuple[torch.Tensor, SelectionRecord]:
        """The loss of one micro-batch on its kept tokens, and the record of what was selected.

        The loss is `Σ_kept weight · loss / D`, with `D` from [`loss_denominator`] for the rollouts `step` describes.

        Args:
            batch ([`TokenBatch`]): The micro-batch.
            global_step (`int`): Optimizer steps completed so far.
            training (`bool`): Whether this is a training micro-batch (statistics accumulate only then).
            step ([`StepTokens`], *optional*): What the adapter counted before any forward (the base trainer's count
                and the rollouts of the optimizer step). `None`: the micro-batch's own rollouts and no base count.

        Returns:
            `tuple`: The scalar loss and the [`SelectionRecord`].
        """
        missing = sorted(self.provider_requires - set(batch.extras))
        if missing:
            raise ValueError(f"The selector needs the extra signals {missing}, which the trainer did not compute.")
        # ZeRO-3 partitioned heads are gathered for the signals pass and the loss (a no-op otherwise).
        with gathered_heads(batch.student_head, batch.teacher_head):
            return self._compute(batch, global_step, training, step or StepTokens())

    def _compute(self, batch: TokenBatch, global_step: int, training: bool, step: StepTokens):
        extras = dict(batch.extras)
        plan = self.signal_plan
        heads = (batch.student_head, batch.teacher_head)
        hidden, teacher_hidden = batch.student_hidden, batch.teacher_hidden
        kwargs = dict(beta=self.beta, temperature=self.temperature, chunk_size=self.chunk_size)
        # One chunked pass for the signals; a rule whose kept set is known before them (it declares so) takes its
        # loss in the same pass, any other in a second pass over the kept positions only.
        one_pass = self.keeps_every_token
        weights = torch.ones(hidden.size(0), dtype=torch.float32, device=hidden.device) if one_pass else None
        signals_hidden = hidden if one_pass else hidden.detach()
        loss_sum, values = chunked_pass(signals_hidden, teacher_hidden, *heads, batch.targets, weights, plan, **kwargs)
        signals = TokenSignals.from_values(values, batch.seq_idx, batch.pos_idx)
        extras.update({name: values[name] for name in plan.divergences})
        weights, quadrant, thresholds = self.select(signals, extras, global_step, training)
        if not one_pass:
            kept = (weights > 0).nonzero(as_tuple=True)[0]
            # After student-only signals, the teacher's side of the kept tokens comes with their loss.
            kept_plan = None if plan.teacher else SignalPlan(self.divergence, self.divergence_top_k)
            kept_rows = (hidden[kept], teacher_hidden[kept], *heads, batch.targets[kept], weights[kept], kept_plan)
            loss_sum, kept_values = chunked_pass(*kept_rows, **kwargs)
            if kept_plan is not None:
                signals, quadrant, thresholds = self._with_kept_teacher_signals(signals, kept, kept_values)
                weights = torch.where(signals.finite, weights, torch.zeros_like(weights))
        lengths = step.rollout_lengths
        if lengths is None:
            # The micro-batch's own rollouts (over all processes in training, as the base count covers them).
            lengths = torch.bincount(batch.seq_idx.long(), minlength=1).to(loss_sum.device)
            num_processes = 1
            if training:
                lengths = self.processes.gather_rows(lengths)
                num_processes = self.processes.num_processes
        else:
            num_processes = self.processes.num_processes if training else 1
        denominator = self.loss_denominator(lengths, step.base_count, num_processes).to(loss_sum.device)
        loss = torch.where(denominator > 0, loss_sum / denominator.to(loss_sum.dtype).clamp_min(1e-30), loss_sum * 0.0)
        if training:
            self.statistics.update(signals, quadrant, weights, *thresholds)
            micro_batches = step.micro_batches if step.rollout_lengths is not None else 1
            self._check_step(signals, weights, batch.teacher_hidden, lengths, global_step, micro_batches)
        record = SelectionRecord(
            global_step=global_step,
            micro_step=self._micro[1] if training else self._eval_micro - 1,
            training=training,
            signals=signals,
            quadrant=quadrant.detach(),
            weights=weights.detach(),
            entropy_threshold=thresholds[0],
            divergence_threshold=thresholds[1],
            loss=loss.detach(),
            input_ids=None if batch.input_ids is None else batch.input_ids.detach(),
            attention_mask=None if batch.attention_mask is None else batch.attention_mask.detach(),
            labels=None if batch.labels is None else batch.labels.detach(),
            extras={k: v.detach() for k, v in extras.items()},
        )
        for observer in self.observers:
            observer.on_selection(record, self)
        return loss, record

    def _with_kept_teacher_signals(self, signals: TokenSignals, kept: torch.Tensor, values: dict[str, torch.Tensor]):
        """`teacher_signals="kept"`: the student-only signals completed with the teacher's side of the kept tokens
        (NaN on the dropped ones; a kept token whose teacher logits are not finite is dropped), and the quadrant split
        of the tokens whose divergence is known, the kept ones (quadrant 0 for the others): what the statistics
        describe then."""
        merged = {name: getattr(signals, name) for name in STUDENT_SIGNALS}
        for name in set(SIGNAL_NAMES) - set(STUDENT_SIGNALS):
            merged[name] = torch.full_like(signals.entropy, float("nan")).index_copy(0, kept, values[name])
        finite = signals.finite.index_copy(0, kept, signals.finite[kept] & values["finite"])
        signals = TokenSignals(**merged, finite=finite, seq_idx=signals.seq_idx, pos_idx=signals.pos_idx)
        thresholds = quadrant_thresholds(signals, self.split, self.processes.gather_rows)
        quadrant = assign_quadrants(signals.entropy, signals.divergence, *thresholds)
        quadrant = torch.where(finite & ~signals.divergence.isnan(), quadrant, torch.zeros_like(quadrant))
        return signals, quadrant, thresholds

    def loss_denominator(
        self, rollout_lengths: torch.Tensor, base_count: torch.Tensor | float | None = None, num_processes: int = 1
    ) -> torch.Tensor:
        """The one denominator `D` of the loss `Σ_kept weight · loss / D` of every micro-batch of a step.

        With `E` the eligible tokens of the rollouts (`rollout_lengths`, every rollout of the optimizer step on every
        process) and `P` the tokens the rule plans to keep of them (the sum of [`planned_kept`]), `D = n · P / E` for
        the base trainer's divisor `n` with every token kept (`E / num_processes` if not given). In training
        `n = E / W` over `W` processes (DDP averages the processes' gradients), so the step's gradient is that of
        `Σ_kept weight · loss / P` over the step's tokens: it does not depend on how the rows are split into
        micro-batches or processes. With every token kept `P = E` and `D = n` exactly: the base trainer's loss.

        Returns:
            `torch.Tensor`: 0-dim float64 (0 when the rule plans to keep nothing).
        """
        lengths = rollout_lengths.reshape(-1)
        eligible = lengths.double().sum()
        planned = planned_kept(self.selector, lengths).sum()
        ratio = torch.where(eligible > 0, planned / eligible.clamp_min(1.0), torch.zeros_like(eligible))
        if base_count is None:
            base = eligible / num_processes
        else:
            base = torch.as_tensor(base_count, device=eligible.device).double()
        return base * ratio

    def _check_step(self, signals, weights, teacher_hidden, lengths, global_step: int, micro_batches: int) -> None:
        """After the optimizer step's last micro-batch (counted, so every process runs the one collective at the same
        call): an error if every eligible token of the step was skipped as non-finite on every process, a warning
        (once) if the step kept no token."""
        counts = torch.stack(
            [
                signals.finite.new_tensor(float(len(signals)), dtype=torch.float64),
                signals.finite.sum().double(),
                (weights > 0).sum().double(),
                torch.isfinite(teacher_hidden).all(-1).sum().double(),
            ]
        )
        if self._step_counts is None or self._step_counts[0] != global_step:
            self._step_counts = (global_step, 0, torch.zeros_like(counts))
        _, seen, total = self._step_counts
        seen, total = seen + 1, total + counts.to(total.device)
        if seen < micro_batches:
            self._step_counts = (global_step, seen, total)
            return  # more micro-batches of this step to come
        self._step_counts = None
        eligible, finite, kept, teacher_finite = self.processes.reduce_sum(total).tolist()
        if eligible == 0:
            return
        if finite == 0:
            culprit = (
                "the teacher's hidden states are not finite"
                if teacher_finite < eligible
                else "the student's or the teacher's logits are not finite"
            )
            raise FloatingPointError(
                f"Every eligible token of optimizer step {global_step} ({int(eligible)} tokens over all processes) was "
                f"skipped as non-finite: {culprit}, so the step would train on nothing (GKDTrainer would take NaN "
                "gradients). Check the models' weights (a NaN teacher) and dtype (fp16 overflows: use bf16 or fp32)."
            )
        if kept == 0 and not self._warned_empty_step:
            self._warned_empty_step = True
            shown = [int(n) for n in lengths.reshape(-1).tolist()]
            listed = ", ".join(map(str, shown[:32])) + (", ..." if len(shown) > 32 else "")
            ratio = getattr(self.selector, "keep_ratio", None)
            logger.warning(
                f"Optimizer step {global_step} kept no token: {self.selector!r} (keep_ratio={ratio}) on rollouts of "
                f"[{listed}] eligible tokens; the student is not updated by such a step. A per-rollout budget "
                "floor(keep_ratio * m) keeps nothing of a rollout shorter than 1 / keep_ratio: raise keep_ratio or "
                "max_new_tokens / max_completion_length, or use budget_scope='batch'. (Warned once.)"
            )

    # ------------------------------------------------------------------ logging and checkpoints

    def log_metrics(self, num_steps: int) -> dict[str, float]:
        """The `tip/...` (and the selector's own) metrics since the last call, over all processes; then resets.

        Every process must call it at the same time (it reduces over processes). Empty if nothing was recorded.
        """
        if self.statistics.empty:
            return {}
        reducer = self.processes.reducer
        metrics = self.statistics.compute(reducer, num_steps=num_steps)
        if hasattr(self.selector, "compute_metrics"):
            metrics.update(self.selector.compute_metrics(reducer))
        self.statistics.reset()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """Pending statistics, the selector's state and the micro-batch counter (saved with each checkpoint)."""
        state: dict[str, Any] = {"statistics": self.statistics.state_dict(), "micro": list(self._micro)}
        if hasattr(self.selector, "state_dict"):
            state["selector"] = self.selector.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what [`state_dict`] returned."""
        self.statistics.load_state_dict(state["statistics"])
        if "micro" in state:
            self._micro = (int(state["micro"][0]), int(state["micro"][1]))
        if "selector" in state and hasattr(self.selector, "load_state_dict"):
            self.selector.load_state_dict(state["selector"])
