"""Evaluation: with `all`, TIPTrainer's eval loss is GKDTrainer's in every way Trainer computes it, and a sampling
rule selects the same tokens on every evaluation of the same model."""

import copy

import numpy as np
import pytest
import torch
from conftest import record_selections, tiny_args

from trl_tip import TIPTrainer
from trl_tip._compat import GKDConfig, GKDTrainer
from trl_tip.toy import arithmetic_dataset


COMMON = dict(use_cpu=True, bf16=False, seed=0, per_device_eval_batch_size=4, report_to="none", disable_tqdm=True)


@pytest.fixture
def eval_dataset():
    return arithmetic_dataset(10, seed=5)  # 3 batches of 4, 4, 2 rows: unequal token counts


def _pair(tmp_path, student, teacher, tokenizer, dataset, eval_dataset, beta=0.5):
    gkd = GKDTrainer(
        model=copy.deepcopy(student),
        teacher_model=teacher,
        args=GKDConfig(output_dir=str(tmp_path / "gkd"), beta=beta, **COMMON),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    tip = TIPTrainer(
        model=copy.deepcopy(student),
        teacher_model=teacher,
        args=tiny_args(tmp_path / "tip", token_selection="all", beta=beta, **COMMON),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    return gkd, tip


@pytest.mark.parametrize("counts_items", [True, False], ids=["num_items_in_batch", "no_num_items_in_batch"])
def test_evaluate_all_equals_gkd(tmp_path, student, teacher, tokenizer, dataset, eval_dataset, counts_items):
    """`Trainer.evaluate` passes `num_items_in_batch` to `compute_loss` when the model accepts loss kwargs (Qwen2
    does), else not: both ways the eval loss equals GKD's."""
    gkd, tip = _pair(tmp_path, student, teacher, tokenizer, dataset, eval_dataset)
    assert gkd.model_accepts_loss_kwargs and tip.model_accepts_loss_kwargs
    for trainer in (gkd, tip):
        trainer.model_accepts_loss_kwargs = counts_items
    loss_gkd, loss_tip = gkd.evaluate()["eval_loss"], tip.evaluate()["eval_loss"]
    assert loss_tip == pytest.approx(loss_gkd, rel=1e-5)
    # Both trainers' batches differ in size, so the mean over batches is not the mean over tokens: a wrong
    # normalisation would show.
    assert loss_tip == pytest.approx(tip.evaluate(eval_dataset)["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("beta", [0.5, 0.1])
def test_prediction_step_and_compute_loss_in_eval_equal_gkd(
    tmp_path, student, teacher, tokenizer, dataset, eval_dataset, beta
):
    gkd, tip = _pair(tmp_path, student, teacher, tokenizer, dataset, eval_dataset, beta=beta)
    batch = tip._prepare_inputs(next(iter(tip.get_eval_dataloader())))
    n = (batch["labels"][:, 1:] != -100).sum()
    for trainer in (gkd, tip):
        trainer.model.eval()
    for prediction_loss_only in (True, False):
        loss_gkd = gkd.prediction_step(gkd.model, dict(batch), prediction_loss_only=prediction_loss_only)[0]
        loss_tip = tip.prediction_step(tip.model, dict(batch), prediction_loss_only=prediction_loss_only)[0]
        torch.testing.assert_close(loss_tip, loss_gkd.float(), rtol=1e-5, atol=1e-8)
    with torch.no_grad():
        # Without a count: the mean over the batch's tokens; with one: sum / count, whatever the count (a count over
        # several processes or micro-batches is larger than this batch's).
        for num_items in (None, n, 3 * n):
            loss_gkd = gkd.compute_loss(gkd.model, dict(batch), num_items_in_batch=num_items)
            loss_tip = tip.compute_loss(tip.model, dict(batch), num_items_in_batch=num_items)
            torch.testing.assert_close(loss_tip, loss_gkd.float(), rtol=1e-5, atol=1e-8, msg=str(num_items))


def test_compute_metrics_gets_the_student_logits_like_gkd(
    tmp_path, student, teacher, tokenizer, dataset, eval_dataset
):
    """The loss never builds the logits; with `compute_metrics` the evaluation still returns them (it returned none,
    and Trainer then skipped `compute_metrics` silently)."""
    gkd, tip = _pair(tmp_path, student, teacher, tokenizer, dataset, eval_dataset)
    predictions = {}
    for name, trainer in (("gkd", gkd), ("tip", tip)):

        def compute_metrics(prediction, name=name):
            predictions[name] = prediction.predictions
            return {"rows": float(len(prediction.predictions))}

        trainer.compute_metrics = compute_metrics
        metrics = trainer.evaluate()
        assert metrics["eval_rows"] == len(eval_dataset)
    assert predictions["tip"].shape == predictions["gkd"].shape
    np.testing.assert_allclose(predictions["tip"], predictions["gkd"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "rule, options",
    [("entropy_sample", {"keep_ratio": 0.5}), ("random", {"keep_ratio": 0.3}), ("tip", {"keep_ratio": 0.4})],
)
def test_sampling_rule_eval_is_deterministic(
    tmp_path, student, teacher, tokenizer, dataset, eval_dataset, rule, options
):
    """Each evaluation restarts the counter that seeds its batches: the same model selects the same tokens."""
    trainer = TIPTrainer(
        model=student,
        teacher_model=teacher,
        args=tiny_args(tmp_path, token_selection=rule, **options, **COMMON),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    recorder = record_selections(trainer, training_only=False)
    first = trainer.evaluate()["eval_loss"]
    first_weights = [r.weights.clone() for r in recorder.records]
    recorder.records.clear()
    second = trainer.evaluate()["eval_loss"]
    assert second == first
    assert len(first_weights) == len(recorder.records) == 3
    for a, b in zip(first_weights, recorder.records):
        assert torch.equal(a, b.weights)
        assert 0 < int((a > 0).sum()) < len(a)  # a real subset, not every token
