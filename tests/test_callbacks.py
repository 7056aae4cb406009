"""Callbacks that observe and steer the selection: schedules and a user-written observer."""

import pytest
from conftest import tiny_trainer

from trl_tip import AllTokens, SelectionCallback, SelectionScheduleCallback, linear_keep_ratio


def kept_fracs(trainer):
    return [log["tip/kept_frac"] for log in trainer.state.log_history if "tip/kept_frac" in log]


def test_linear_keep_ratio_by_hand():
    schedule = linear_keep_ratio(1.0, 0.2, warmup=0.1, anneal=0.4)
    assert schedule(0.0) == 1.0 and schedule(0.09) == 1.0
    assert schedule(0.1) == pytest.approx(1.0)
    assert schedule(0.3) == pytest.approx(0.6)  # halfway through the anneal
    assert schedule(0.5) == pytest.approx(0.2) and schedule(0.9) == 0.2
    assert linear_keep_ratio(0.5, 0.5)(0.3) == 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"start": 0.0, "end": 0.5}, "start keep ratio"),
        ({"start": 1.0, "end": 1.5}, "end keep ratio"),
        ({"start": 1.0, "end": 0.5, "warmup": 0.8, "anneal": 0.3}, "warmup \\+ anneal"),
    ],
)
def test_linear_keep_ratio_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        linear_keep_ratio(**kwargs)


def test_schedule_callback_needs_exactly_one_schedule():
    with pytest.raises(ValueError, match="exactly one"):
        SelectionScheduleCallback()
    with pytest.raises(ValueError, match="exactly one"):
        SelectionScheduleCallback(keep_ratio=lambda p: 0.5, phases=[(0.5, AllTokens())])
    with pytest.raises(ValueError, match="increasing"):
        SelectionScheduleCallback(phases=[(0.6, AllTokens()), (0.3, AllTokens())])
    with pytest.raises(ValueError, match="warmup_all_tokens"):
        SelectionScheduleCallback(warmup_all_tokens=1.5)


def test_warmup_on_all_tokens_then_the_rule(tmp_path, student, teacher, tokenizer, dataset):
    trainer = tiny_trainer(
        tmp_path, student, teacher, tokenizer, dataset,
        callbacks=[SelectionScheduleCallback(warmup_all_tokens=0.5)],
        token_selection="entropy_topk", keep_ratio=0.25, max_steps=4,
    )  # fmt: skip
    trainer.train()
    fracs = kept_fracs(trainer)
    assert fracs[:2] == [1.0, 1.0]
    assert all(f < 0.5 for f in fracs[2:])


def test_keep_ratio_schedule_is_followed(tmp_path, student, teacher, tokenizer, dataset):
    schedule = linear_keep_ratio(1.0, 0.25, warmup=0.25, anneal=0.5)  # steps 1..4 at progress 0, .25, .5, .75
    callback = SelectionScheduleCallback(keep_ratio=schedule)
    trainer = tiny_trainer(
        tmp_path, student, teacher, tokenizer, dataset, callbacks=[callback],
        token_selection="random", keep_ratio=0.5, max_steps=4,
    )  # fmt: skip
    trainer.train()
    fracs = kept_fracs(trainer)
    expected = [1.0, 1.0, 0.625, 0.25]
    for got, want in zip(fracs, expected, strict=True):
        assert got == pytest.approx(want, abs=0.06)  # rounding of the budget on ~20 tokens
    assert trainer.selector.keep_ratio == pytest.approx(0.25)


def test_keep_ratio_schedule_needs_a_budgeted_rule(tmp_path, student, teacher, tokenizer, dataset):
    with pytest.raises(ValueError, match="needs a budgeted rule"):
        tiny_trainer(
            tmp_path, student, teacher, tokenizer, dataset,
            callbacks=[SelectionScheduleCallback(keep_ratio=lambda p: 0.5)], token_selection="all",
        )  # fmt: skip


class RaiseKeepRatioOnQ3(SelectionCallback):
    """A user-written observer: when more than a quarter of a micro-batch's kept tokens are Q3, train on every token
    of the next step (a made-up policy, to show the mechanism)."""

    def __init__(self):
        self.q3_shares = []
        self.switched_at = None

    def on_selection(self, record, engine):
        if not record.training:
            return
        kept = record.kept
        share = float((record.quadrant[kept] == 3).float().mean()) if kept.any() else 0.0
        self.q3_shares.append(share)
        if share > 0.25 and self.switched_at is None:
            self.switched_at = record.global_step
            engine.selector.keep_ratio = 1.0


def test_user_callback_reads_records_and_changes_the_selection(tmp_path, student, teacher, tokenizer, dataset):
    callback = RaiseKeepRatioOnQ3()
    trainer = tiny_trainer(
        tmp_path, student, teacher, tokenizer, dataset, callbacks=[callback],
        token_selection="entropy_divergence_sample", keep_ratio=0.5, max_steps=3,
    )  # fmt: skip
    trainer.train()
    assert callback.engine is trainer.tip_engine and len(callback.q3_shares) == 3
    assert callback.switched_at is not None, callback.q3_shares
    fracs = kept_fracs(trainer)
    assert fracs[callback.switched_at + 1 :] == [1.0] * (3 - callback.switched_at - 1)
