"""Numerical faults end to end on CPU: non-finite logits, empty and truncated completions, one-quadrant steps."""

import copy

import pytest
import torch
from conftest import tiny_args

from trl_tip import TIPTrainer


def nonfinite_rows(positions: torch.Tensor) -> torch.Tensor:
    """Positions (index into the sequence) whose final hidden state the injector corrupts: NaN or +inf."""
    return positions % 3 != 0


class InjectNonFinite(torch.nn.Module):
    """Wraps a model's final norm: rows at `nonfinite_rows` positions become NaN (odd) or +inf (even) while `active`.

    The corrupted hidden state makes that position's logits non-finite, whatever head computes them.
    """

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.norm = norm
        self.active = True

    def forward(self, hidden):
        out = self.norm(hidden)
        if not self.active:
            return out
        positions = torch.arange(out.size(1), device=out.device)
        bad = nonfinite_rows(positions)
        fill = torch.where(positions % 2 == 1, float("nan"), float("inf")).to(out.dtype)
        return torch.where(bad[None, :, None], fill[None, :, None].expand_as(out), out)


class RecordingTrainer(TIPTrainer):
    """Records, per training micro-batch, how many eligible positions the injector corrupts.

    The student's injector is switched on only inside `compute_loss`, so the student's rollouts stay finite.
    """

    student_injector: InjectNonFinite | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            _, pos_idx = (inputs["labels"][:, 1:] != -100).nonzero(as_tuple=True)
            self.expected_skipped.append(int(nonfinite_rows(pos_idx).sum()))
            self.expected_eligible.append(int(pos_idx.numel()))
        if self.student_injector is not None:
            self.student_injector.active = True
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            if self.student_injector is not None:
                self.student_injector.active = False


def build(tmp_path, student, teacher, tokenizer, dataset, trainer_cls=TIPTrainer, selector=None, **overrides):
    trainer = trainer_cls(
        model=student,
        teacher_model=teacher,
        args=tiny_args(tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        selector=selector,
    )
    trainer.expected_skipped, trainer.expected_eligible = [], []
    return trainer


def step_logs(trainer):
    return [log for log in trainer.state.log_history if "loss" in log]


def assert_finite_parameters(model):
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} is not finite after training"


FAULT_RULES = [
    ("all", {}),
    ("entropy_sample", {"keep_ratio": 0.5}),
    ("tip", {"keep_ratio": 0.5}),
    ("q3_score", {"keep_ratio": 0.2}),
    ("entropy_topk", {"keep_ratio": 0.5}),
]


@pytest.mark.parametrize("side", ["teacher", "student"])
@pytest.mark.parametrize("rule, options", FAULT_RULES, ids=[r for r, _ in FAULT_RULES])
def test_nonfinite_logits_are_skipped_and_counted(tmp_path, student, teacher, tokenizer, dataset, side, rule, options):
    model = teacher if side == "teacher" else student
    injector = InjectNonFinite(model.model.norm)
    model.model.norm = injector
    trainer = build(
        tmp_path, student, teacher, tokenizer, dataset, RecordingTrainer, token_selection=rule, max_steps=2, **options
    )
    if side == "student":
        injector.active = False  # rollouts are generated finite; the loss pass sees the corrupted rows
        trainer.student_injector = injector
    trainer.train()
    logs = step_logs(trainer)
    assert len(logs) == 2 and len(trainer.expected_skipped) == 2
    for log, skipped, eligible in zip(logs, trainer.expected_skipped, trainer.expected_eligible, strict=True):
        assert skipped > 0
        assert log["tip/skipped_nonfinite"] == skipped
        assert log["tip/tokens_eligible"] == eligible - skipped
        assert torch.isfinite(torch.tensor(log["loss"])) and torch.isfinite(torch.tensor(log["grad_norm"]))
        assert sum(log[f"tip/q{q}/frac"] for q in range(1, 5)) == pytest.approx(1.0)
    assert_finite_parameters(trainer.model)


@pytest.mark.parametrize("rule", ["all", "tip", "q3_score"])
def test_nonfinite_teacher_rows_drop_out_of_the_loss_exactly(tmp_path, student, teacher, tokenizer, dataset, rule):
    """With corrupted teacher rows, the kept-token loss sum is that of the same batch with those positions unlabelled;
    the denominator, fixed before any forward, still counts them (the rule's planned tokens of every eligible one)."""
    clean_teacher = copy.deepcopy(teacher)
    teacher.model.norm = InjectNonFinite(teacher.model.norm)
    faulty = build(tmp_path / "a", student, teacher, tokenizer, dataset, token_selection=rule, lmbda=0.0)
    clean = build(tmp_path / "b", student, clean_teacher, tokenizer, dataset, token_selection=rule, lmbda=0.0)
    batch = faulty._prepare_inputs(next(iter(faulty.get_train_dataloader())))
    masked = dict(batch)
    labels = batch["labels"].clone()
    positions = torch.arange(labels.size(1) - 1)
    labels[:, 1:][:, nonfinite_rows(positions)] = -100
    masked["labels"] = labels
    faulty.model.eval()
    with torch.no_grad():
        loss_faulty = faulty.compute_loss(faulty.model, dict(batch))
        loss_clean = clean.compute_loss(clean.model, masked)
    assert torch.isfinite(loss_faulty)

    def planned(labels):
        lengths = (labels[:, 1:] != -100).sum(1)
        return faulty.tip_engine.loss_denominator(lengths)

    torch.testing.assert_close(loss_faulty * planned(batch["labels"]), loss_clean * planned(labels))


class LogitBias:
    """A forward hook on `lm_head` adding `value` to the logits of `token_ids` (steers generation)."""

    def __init__(self, token_ids, value):
        self.token_ids, self.value = list(token_ids), value

    def __call__(self, module, args, output):
        bias = torch.zeros(output.size(-1), dtype=output.dtype, device=output.device)
        bias[self.token_ids] = self.value
        return output + bias


@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["pad_differs", "pad_is_eos"])
@pytest.mark.parametrize(
    "rule, options", [("all", {}), ("tip", {"keep_ratio": 0.5}), ("entropy_sample", {"keep_ratio": 0.5})]
)
def test_empty_completions_give_a_defined_loss(
    tmp_path, student, teacher, tokenizer, dataset, rule, options, pad_is_eos
):
    """The student emits EOS at once: each completion is the EOS token alone.

    GKD labels the completion by position up to and including the first EOS (not by pad id), so the EOS is the one
    eligible token of each row even when the pad token is the EOS token.
    """
    if pad_is_eos:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
        for model in (student, teacher):
            model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    student.lm_head.register_forward_hook(LogitBias([tokenizer.eos_token_id], 1e4))
    trainer = build(tmp_path, student, teacher, tokenizer, dataset, token_selection=rule, max_steps=2, **options)
    trainer.train()
    logs = step_logs(trainer)
    assert len(logs) == 2
    for log in logs:
        assert torch.isfinite(torch.tensor(log["loss"])) and torch.isfinite(torch.tensor(log["grad_norm"]))
        assert log["tip/skipped_nonfinite"] == 0
        assert log["tip/tokens_eligible"] == trainer.args.per_device_train_batch_size
        assert all(v == v for k, v in log.items() if k.startswith("tip/")), "a NaN metric"
    assert_finite_parameters(trainer.model)


def test_completions_truncated_at_max_new_tokens(tmp_path, student, teacher, tokenizer, dataset):
    """The student never emits EOS: every completion is cut at `max_new_tokens` and all its tokens are trained."""
    student.lm_head.register_forward_hook(LogitBias([tokenizer.eos_token_id, tokenizer.pad_token_id], -1e4))
    trainer = build(
        tmp_path, student, teacher, tokenizer, dataset, token_selection="tip", max_steps=2, max_new_tokens=3
    )
    trainer.train()
    for log in step_logs(trainer):
        assert log["tip/tokens_eligible"] == trainer.args.per_device_train_batch_size * 3
        assert log["tip/kept_frac"] > 0 and torch.isfinite(torch.tensor(log["loss"]))


ONE_QUADRANT_RULES = [
    ("all", {}, 1.0),
    ("random", {"keep_ratio": 0.5}, 0.5),
    ("entropy_topk", {"keep_ratio": 0.5}, None),
    ("entropy_sample", {"keep_ratio": 0.5}, 0.5),
    ("entropy_divergence_sample", {"keep_ratio": 0.5}, 0.5),
    ("quadrants", {"quadrants": ["Q1"]}, 1.0),
    ("quadrants", {"quadrants": ["Q3"]}, 0.0),
    ("quadrant_budget", {"keep_ratio": 0.5}, 0.5),
    ("tip", {"keep_ratio": 0.5}, None),
]


@pytest.mark.parametrize(
    "rule, options, kept_frac",
    ONE_QUADRANT_RULES,
    ids=[f"{r}-{o.get('quadrants', [''])[0]}".rstrip("-") for r, o, _ in ONE_QUADRANT_RULES],
)
def test_every_token_in_one_quadrant(tmp_path, student, teacher, tokenizer, dataset, rule, options, kept_frac):
    """Fixed thresholds 0 / 0 put every token in Q1 (H >= 0 and D >= 0); each rule still gives a defined step."""
    trainer = build(
        tmp_path,
        student,
        teacher,
        tokenizer,
        dataset,
        token_selection=rule,
        entropy_threshold=0.0,
        divergence_threshold=0.0,
        max_steps=1,
        **options,
    )
    trainer.train()
    (log,) = step_logs(trainer)
    assert log["tip/q1/frac"] == 1.0
    assert log["tip/q2/frac"] == log["tip/q3/frac"] == log["tip/q4/frac"] == 0.0
    assert torch.isfinite(torch.tensor(log["loss"]))
    if kept_frac is None:
        assert 0.0 < log["tip/kept_frac"] <= 1.0
    else:
        # Budget rounding on a few dozen tokens.
        assert log["tip/kept_frac"] == pytest.approx(kept_frac, abs=0.03)
    if kept_frac == 0.0:
        assert log["loss"] == 0.0


@pytest.mark.parametrize("rule", ["all", "tip"])
def test_a_step_with_no_finite_token_raises(tmp_path, student, teacher, tokenizer, dataset, rule):
    """A teacher with NaN weights makes every token non-finite: rather than train on nothing for the whole run (loss
    0, grad norm 0, only `tip/skipped_nonfinite` telling), the first such step raises, naming the teacher."""
    with torch.no_grad():
        teacher.model.norm.weight.fill_(float("nan"))
    trainer = build(tmp_path, student, teacher, tokenizer, dataset, token_selection=rule, max_steps=2)
    with pytest.raises(FloatingPointError, match=r"optimizer step 0 .* the teacher's hidden states are not finite"):
        trainer.train()


def test_some_nonfinite_tokens_in_a_step_do_not_raise(tmp_path, student, teacher, tokenizer, dataset):
    """Only a step without a single finite token is an error; skipped tokens among finite ones are counted."""
    teacher.model.norm = InjectNonFinite(teacher.model.norm)
    trainer = build(tmp_path, student, teacher, tokenizer, dataset, token_selection="all", max_steps=1)
    trainer.train()
    log = step_logs(trainer)[-1]
    assert log["tip/skipped_nonfinite"] > 0 and log["tip/tokens_kept"] > 0
