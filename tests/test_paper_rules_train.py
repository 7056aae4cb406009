"""End to end: `TIPTrainer.train()` with each of the paper's rules on tiny models, checked against the selection
records and the logs."""

import logging
import math

import pytest
import torch
from conftest import record_selections, tiny_args

import trl_tip.engine as engine_module
from trl_tip import TIPTrainer, metric_names


def train(tmp_path, student, teacher, tokenizer, dataset, **options):
    trainer = TIPTrainer(
        model=student,
        teacher_model=teacher,
        args=tiny_args(tmp_path, **options),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    recorder = record_selections(trainer)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    return trainer, recorder.records, logs


def rollout_counts(record):
    """(finite tokens, kept tokens) of each rollout of a record."""
    signals, kept = record.signals, record.weights > 0
    rows = torch.unique(signals.seq_idx).tolist()
    return [
        (int((signals.finite & (signals.seq_idx == r)).sum()), int((kept & (signals.seq_idx == r)).sum()))
        for r in rows
    ]


PER_ROLLOUT = [
    ("tip", {}, 0.5),
    ("tip", {"keep_ratio": 0.2}, 0.2),
    ("tip", {"score_order": "lowest"}, 0.5),
    ("q3_score", {"keep_ratio": 0.2}, 0.2),
    ("divergence_topk", {"keep_ratio": 0.5}, 0.5),
    ("entropy_sample", {"budget_scope": "rollout"}, 0.5),
    ("entropy_topk", {"budget_scope": "rollout", "score_order": "lowest"}, 0.5),
    ("random", {"budget_scope": "rollout"}, 0.5),
    ("quadrant_budget", {"budget_scope": "rollout", "q3_share": 0.5}, None),
]


@pytest.mark.parametrize(
    "rule, options, ratio", PER_ROLLOUT, ids=[f"{r}-{'-'.join(map(str, o.values()))}" for r, o, _ in PER_ROLLOUT]
)
def test_per_rollout_rules_train_and_log_what_they_kept(
    tmp_path, student, teacher, tokenizer, dataset, rule, options, ratio
):
    trainer, records, logs = train(
        tmp_path, student, teacher, tokenizer, dataset, token_selection=rule, max_steps=2, **options
    )
    assert len(records) == len(logs) == 2
    for record, log in zip(records, logs):
        counts = rollout_counts(record)
        if ratio is not None:
            # floor(rho * m) of each rollout's m finite tokens.
            assert [k for _, k in counts] == [math.floor(ratio * m + 1e-9) for m, _ in counts], counts
        else:  # the quadrant budget keeps at most floor(rho * m), never Q4
            assert all(k <= math.floor(0.5 * m + 1e-9) for m, k in counts)
            assert log["tip/q4/kept_frac"] == 0.0
        # The logs say what the records say.
        assert log["tip/tokens_kept"] == sum(k for _, k in counts)
        assert log["tip/tokens_eligible"] == sum(m for m, _ in counts)
        assert set(metric_names()) <= set(log)
        # The loss is the mean of the per-token loss over the kept tokens (one micro-batch per step, one process).
        kept = record.weights > 0
        if kept.any():
            expected = (record.signals.loss[kept] * record.weights[kept]).sum() / record.weights[kept].sum()
            assert record.loss.item() == pytest.approx(expected.item(), rel=1e-4)
            assert log["loss"] == pytest.approx(record.loss.item(), rel=1e-4)
        else:
            assert record.loss.item() == 0.0


def test_default_divergence_axis_is_the_per_token_loss(tmp_path, student, teacher, tokenizer, dataset):
    _, records, _ = train(tmp_path, student, teacher, tokenizer, dataset, token_selection="tip", beta=1.0, max_steps=1)
    (record,) = records
    assert torch.equal(record.signals.divergence, record.signals.loss)


def test_tip_lowest_keeps_the_complement_of_tip(tmp_path, student, teacher, tokenizer, dataset):
    """Soft-OR's top 50% and bottom 50% of each even-length rollout split it (the paper's Table 6 control)."""
    import copy

    top = train(
        tmp_path / "top", copy.deepcopy(student), teacher, tokenizer, dataset, token_selection="tip", max_steps=1
    )
    bottom = train(
        tmp_path / "bottom",
        student,
        teacher,
        tokenizer,
        dataset,
        token_selection="tip",
        score_order="lowest",
        max_steps=1,
    )
    (a,), (b,) = top[1], bottom[1]
    assert torch.equal(a.signals.entropy, b.signals.entropy)  # same rollouts, same signals
    kept_a, kept_b = a.weights > 0, b.weights > 0
    assert not (kept_a & kept_b).any()
    for r in torch.unique(a.signals.seq_idx).tolist():
        row = a.signals.seq_idx == r
        m = int((row & a.signals.finite).sum())
        if m % 2 == 0:
            assert int(((kept_a | kept_b) & row).sum()) == m


def test_q3_score_reads_the_forward_kl_from_the_same_pass(tmp_path, student, teacher, tokenizer, dataset, monkeypatch):
    calls = []
    original = engine_module.chunked_pass

    def counting(*args, **kwargs):
        plan = kwargs["signals"] if "signals" in kwargs else (args[6] if len(args) > 6 else None)
        calls.append(None if plan is None else plan.divergences)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine_module, "chunked_pass", counting)
    trainer, records, logs = train(
        tmp_path,
        student,
        teacher,
        tokenizer,
        dataset,
        token_selection="q3_score",
        keep_ratio=0.3,
        divergence="forward_kl",
        max_steps=2,
    )
    assert trainer.tip_engine.signal_plan.divergences == ("forward_kl",)
    # Per micro-batch one chunked signals pass, which also returns the forward KL, then the loss on the kept tokens.
    assert calls == [("forward_kl",), None, ("forward_kl",), None]
    for record in records:
        # Here the D axis is the forward KL too: the extra is the same numbers.
        assert torch.equal(record.extras["forward_kl"], record.signals.divergence)
        kept = record.weights > 0
        assert kept.any()


def test_rollouts_shorter_than_one_over_rho_keep_nothing_and_give_a_zero_loss(
    tmp_path, student, teacher, tokenizer, dataset, caplog
):
    """q3_score at its default 10% on completions of at most 6 tokens: floor(0.1 * m) = 0 for every rollout. The
    first such step warns (once), naming the rule, keep_ratio and the rollout lengths."""
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    with caplog.at_level(logging.WARNING):
        trainer, records, logs = train(tmp_path, student, teacher, tokenizer, dataset, token_selection="q3_score")
    warnings = [r.getMessage() for r in caplog.records if "kept no token" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once, although every step keeps nothing
    lengths = sorted(m for m, _ in rollout_counts(records[0]))
    assert "Q3Score(keep_ratio=0.1" in warnings[0] and "(keep_ratio=0.1)" in warnings[0]
    assert "Optimizer step 0 kept no token" in warnings[0]
    listed = [int(n) for n in warnings[0].split("rollouts of [")[1].split("]")[0].split(", ")]
    assert sorted(n for n in listed if n > 0) == lengths
    assert trainer.args.keep_ratio == 0.1
    for record, log in zip(records, logs):
        assert all(m < 10 for m, _ in rollout_counts(record))
        assert not (record.weights > 0).any()
        assert log["loss"] == 0.0 and log["tip/tokens_kept"] == 0 and log["tip/kept_frac"] == 0.0
        assert math.isfinite(log["grad_norm"]) and log["grad_norm"] == 0.0
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_importance_weighted_entropy_sampling_trains_with_the_eligible_normaliser(
    tmp_path, student, teacher, tokenizer, dataset
):
    trainer, records, logs = train(
        tmp_path,
        student,
        teacher,
        tokenizer,
        dataset,
        token_selection="entropy_sample",
        sampling_estimator="importance_weighted",
    )
    assert trainer.tip_engine.selector.planned_kept(torch.tensor([3, 5])).tolist() == [3.0, 5.0]
    for record, log in zip(records, logs):
        signals, weights = record.signals, record.weights
        kept = weights > 0
        assert kept.any() and (weights[kept] >= 1.0).all()  # 1 / p with p <= 1
        # Loss = Σ_kept g / p divided by the eligible count (all finite here), not by the kept weight.
        expected = (signals.loss * weights).sum() / signals.finite.sum()
        assert record.loss.item() == pytest.approx(expected.item(), rel=1e-4)
        assert log["tip/tokens_kept"] == int(kept.sum())
