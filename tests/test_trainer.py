import copy
import json

import pytest
import torch
from conftest import tiny_args

from trl_tip import TIPTrainer, metric_names
from trl_tip._compat import GKDTrainer


def make_trainer(tmp_path, student, teacher, tokenizer, dataset, trainer_cls=TIPTrainer, **overrides):
    args = tiny_args(tmp_path, **overrides)
    return trainer_cls(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


def count_items(batch):
    return (batch["labels"][:, 1:] != -100).sum()


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("beta", [0.5, 0.3])
def test_all_equals_gkd_loss_and_gradients(tmp_path, student, teacher, tokenizer, dataset, beta):
    """`all` takes the fused path (signals read off the loss pass) and equals GKD's loss and gradients."""
    gkd = make_trainer(
        tmp_path / "gkd", copy.deepcopy(student), teacher, tokenizer, dataset, GKDTrainer, lmbda=0.0, beta=beta
    )
    tip = make_trainer(
        tmp_path / "tip", student, teacher, tokenizer, dataset, token_selection="all", lmbda=0.0, beta=beta
    )
    batch = first_batch(tip)
    n = count_items(batch)
    for trainer in (gkd, tip):
        trainer.model.train()
        trainer.model.zero_grad()
    loss_gkd = gkd.compute_loss(gkd.model, dict(batch), num_items_in_batch=n)
    loss_gkd.backward()
    loss_tip = tip.compute_loss(tip.model, dict(batch), num_items_in_batch=n)
    loss_tip.backward()
    torch.testing.assert_close(loss_tip, loss_gkd.float(), rtol=1e-5, atol=1e-7)
    g_gkd, g_tip = grads(gkd.model), grads(tip.model)
    assert set(g_gkd) == set(g_tip) and len(g_tip) > 0
    for name in g_gkd:
        torch.testing.assert_close(g_tip[name], g_gkd[name], rtol=1e-4, atol=1e-7, msg=name)
    assert tip.tip_statistics.compute(None, num_steps=1)["tip/kept_frac"] == 1.0
    # Without num_items_in_batch (eval) both are the mean over the micro-batch's tokens.
    with torch.no_grad():
        gkd.model.eval()
        tip.model.eval()
        torch.testing.assert_close(
            tip.compute_loss(tip.model, dict(batch)), gkd.compute_loss(gkd.model, dict(batch)).float()
        )


def test_gradient_accumulation_normalisation_matches_one_big_batch(tmp_path, student, teacher, tokenizer, dataset):
    tip = make_trainer(tmp_path, student, teacher, tokenizer, dataset, token_selection="all", lmbda=0.0)
    tip.model.train()
    batch = first_batch(tip)
    n = count_items(batch)
    tip.model.zero_grad()
    tip.compute_loss(tip.model, dict(batch), num_items_in_batch=n).backward()
    full = grads(tip.model)
    tip.model.zero_grad()
    for rows in (slice(0, 2), slice(2, 4)):
        half = {k: v[rows] for k, v in batch.items() if torch.is_tensor(v)}
        tip.compute_loss(tip.model, half, num_items_in_batch=n).backward()
    accumulated = grads(tip.model)
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-7, msg=name)


RULES = [
    ("all", {}),
    ("random", {"keep_ratio": 0.5}),
    ("entropy_topk", {"keep_ratio": 0.5}),
    ("entropy_sample", {"keep_ratio": 0.5}),
    ("entropy_divergence_sample", {"keep_ratio": 0.3, "entropy_alpha": 0.5, "divergence_gamma": 2.0}),
    ("quadrants", {"quadrants": ["Q3"]}),
    ("quadrant_budget", {"keep_ratio": 0.2}),
]


@pytest.mark.parametrize("rule, options", RULES, ids=[r for r, _ in RULES])
def test_train_end_to_end_logs_statistics(tmp_path, student, teacher, tokenizer, dataset, rule, options):
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, token_selection=rule, **options)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    step_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(step_logs) == 3
    for log in step_logs:
        missing = set(metric_names()) - set(log)
        assert not missing, missing
        assert sum(log[f"tip/q{q}/frac"] for q in range(1, 5)) == pytest.approx(1.0)
        assert log["tip/tokens_eligible"] > 0
        assert torch.isfinite(torch.tensor(log["loss"]))
        kept = log["tip/kept_frac"]
        if rule == "all":
            assert kept == 1.0
        elif rule == "quadrants":
            assert log["tip/q3/kept_frac"] == 1.0
            assert log["tip/q1/kept_frac"] == log["tip/q2/kept_frac"] == log["tip/q4/kept_frac"] == 0.0
            assert kept == pytest.approx(log["tip/q3/frac"])
        elif rule == "quadrant_budget":
            assert log["tip/q4/kept_frac"] == 0.0
            assert kept == pytest.approx(options["keep_ratio"], abs=0.05)
        else:
            assert kept == pytest.approx(options["keep_ratio"], abs=0.05)
    changed = any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert changed, "training did not update the student"


def test_metrics_reach_trainer_state_json(tmp_path, student, teacher, tokenizer, dataset):
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, token_selection="tip", max_steps=2)
    trainer.train()
    trainer.save_state()
    with open(tmp_path / "trainer_state.json") as f:
        history = json.load(f)["log_history"]
    assert any("tip/q3/frac" in entry for entry in history)


class KeepNothing:
    def __call__(self, signals, context):
        return torch.zeros(len(signals), dtype=torch.bool)


def test_zero_kept_tokens_gives_zero_loss_and_valid_graph(tmp_path, student, teacher, tokenizer, dataset):
    trainer = TIPTrainer(
        model=student,
        teacher_model=teacher,
        args=tiny_args(tmp_path, token_selection="all", lmbda=0.0),
        train_dataset=dataset,
        processing_class=tokenizer,
        selector=KeepNothing(),
    )
    trainer.model.train()
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=count_items(batch))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(torch.count_nonzero(g) == 0 for g in grads(trainer.model).values())
    trainer.train()
    assert all(log["loss"] == 0.0 for log in trainer.state.log_history if "loss" in log)


def test_no_eligible_token_gives_zero_loss(tmp_path, student, teacher, tokenizer, dataset):
    trainer = make_trainer(tmp_path, student, teacher, tokenizer, dataset, token_selection="tip", lmbda=0.0)
    trainer.model.train()
    batch = first_batch(trainer)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(0))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()


def test_custom_weight_selector(tmp_path, student, teacher, tokenizer, dataset):
    calls = []

    def low_entropy_weights(signals, context):
        calls.append((len(signals), context.entropy_threshold))
        return (1.0 - signals.entropy).clamp_min(0)

    trainer = TIPTrainer(
        model=student,
        teacher_model=teacher,
        args=tiny_args(tmp_path, token_selection="all", max_steps=2),
        train_dataset=dataset,
        processing_class=tokenizer,
        selector=low_entropy_weights,
    )
    trainer.train()
    assert len(calls) == 2 and all(n > 0 for n, _ in calls)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (lambda s, c: torch.ones(len(s) + 1, dtype=torch.bool), ValueError, "expected"),
        (lambda s, c: torch.ones(len(s), dtype=torch.long), TypeError, "torch.bool"),
        (lambda s, c: -torch.ones(len(s)), ValueError, "negative"),
    ],
)
def test_bad_selector_output_raises(tmp_path, student, teacher, tokenizer, dataset, bad, error, match):
    trainer = TIPTrainer(
        model=student,
        teacher_model=teacher,
        args=tiny_args(tmp_path, max_steps=1),
        train_dataset=dataset,
        processing_class=tokenizer,
        selector=bad,
    )
    with pytest.raises(error, match=match):
        trainer.train()


def test_trainer_rejects_non_tip_config(tmp_path, student, teacher, tokenizer, dataset):
    from trl_tip._compat import GKDConfig

    args = GKDConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(TypeError, match="TIPConfig"):
        TIPTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer)


def test_selection_is_reproducible_under_seed(tmp_path, student, teacher, tokenizer, dataset):
    histories = []
    for run in range(2):
        trainer = make_trainer(
            tmp_path / str(run),
            copy.deepcopy(student),
            teacher,
            tokenizer,
            dataset,
            token_selection="entropy_sample",
            max_steps=2,
        )
        trainer.train()
        histories.append(
            [(log["loss"], log["tip/q1/kept_frac"]) for log in trainer.state.log_history if "loss" in log]
        )
    assert histories[0] == histories[1]


def test_checkpoint_carries_tip_state_and_resumes(tmp_path, student, teacher, tokenizer, dataset):
    # Copy before a trainer wraps the model's forward (TRL patches `forward` with a closure over the instance).
    fresh_student = copy.deepcopy(student)
    trainer = make_trainer(
        tmp_path, student, teacher, tokenizer, dataset, token_selection="tip", max_steps=2, save_strategy="steps",
        save_steps=1, logging_steps=2,
    )  # fmt: skip
    trainer.train()
    checkpoint = tmp_path / "checkpoint-1"
    state = torch.load(checkpoint / "tip_state_rank0.pt", weights_only=True)
    # Saved after step 1, before the step-2 log: the statistics of step 1 are pending and must survive.
    assert state["statistics"]["totals"].sum() > 0
    resumed = make_trainer(
        tmp_path, fresh_student, teacher, tokenizer, dataset, token_selection="tip", max_steps=2,
        save_strategy="no", logging_steps=2,
    )  # fmt: skip
    resumed.train(resume_from_checkpoint=str(checkpoint))
    uninterrupted = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    log = [entry for entry in resumed.state.log_history if "loss" in entry][-1]
    # The step-2 log covers steps 1 and 2; step 1's statistics come from the checkpoint, so the resumed run logs
    # exactly what the uninterrupted run logged.
    for key in metric_names():
        assert log[key] == pytest.approx(uninterrupted[key], rel=1e-6, abs=1e-9), key
    # (`Trainer` itself does not carry the running training loss across a resume, so `loss` is not compared here.)
    assert resumed.tip_statistics.empty


def test_resumed_run_makes_the_same_rollouts_selections_and_losses(tmp_path, student, teacher, tokenizer, dataset):
    fresh_student = copy.deepcopy(student)
    common = dict(token_selection="entropy_sample", keep_ratio=0.5, max_steps=3, logging_steps=1)
    trainer = make_trainer(
        tmp_path, student, teacher, tokenizer, dataset, save_strategy="steps", save_steps=1, **common
    )
    trainer.train()
    resumed = make_trainer(tmp_path, fresh_student, teacher, tokenizer, dataset, save_strategy="no", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    first = {log["step"]: log for log in trainer.state.log_history if "loss" in log}
    second = {log["step"]: log for log in resumed.state.log_history if "loss" in log}
    assert {2, 3} <= set(second)
    for step in (2, 3):
        for key in [*metric_names(), "loss", "grad_norm"]:
            assert second[step][key] == pytest.approx(first[step][key], rel=1e-5, abs=1e-9), (step, key)


class KilledWhileRotating(RuntimeError):
    pass


def test_kill_while_rotating_checkpoints_leaves_a_complete_newest_checkpoint(
    tmp_path, student, teacher, tokenizer, dataset, monkeypatch, caplog
):
    """`save_total_limit`: `Trainer` deletes old checkpoints at the end of its save. The selection state is written
    before, so a run killed right after the deletion leaves a complete newest checkpoint, and the resumed run logs
    the `tip/*` statistics an uninterrupted run logs."""
    import logging
    import os

    import transformers.trainer as hf_trainer

    fresh = copy.deepcopy(student), copy.deepcopy(student)
    options = dict(
        token_selection="tip", max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=1, logging_steps=3
    )
    reference = make_trainer(tmp_path / "reference", student, teacher, tokenizer, dataset, **options)
    reference.train()

    out = tmp_path / "killed"
    trainer = make_trainer(out, fresh[0], teacher, tokenizer, dataset, **options)
    rotate = hf_trainer.rotate_checkpoints

    def killed_after_deleting(*args, **kwargs):
        rotate(*args, **kwargs)  # checkpoint-1 is deleted ...
        if trainer.state.global_step == 2:
            raise KilledWhileRotating  # ... and the process dies before `_save_checkpoint` returns

    monkeypatch.setattr(hf_trainer, "rotate_checkpoints", killed_after_deleting)
    with pytest.raises(KilledWhileRotating):
        trainer.train()
    monkeypatch.undo()
    assert sorted(name for name in os.listdir(out) if name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "tip_state_rank0.pt").is_file()

    resumed = make_trainer(out, fresh[1], teacher, tokenizer, dataset, **{**options, "save_strategy": "no"})
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=True)
    assert not [r.getMessage() for r in caplog.records if "tip_state" in r.getMessage()]
    expected = [entry for entry in reference.state.log_history if "loss" in entry][-1]
    log = [entry for entry in resumed.state.log_history if "loss" in entry][-1]
    for key in metric_names():
        assert log[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
