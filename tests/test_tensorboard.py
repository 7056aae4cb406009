"""The `tip/...` statistics reach a real experiment tracker: TensorBoard's event file, read back with TensorBoard."""

import pytest
from conftest import tiny_args

from trl_tip import TIPTrainer, metric_names


pytest.importorskip("tensorboard")


def test_tip_scalars_reach_tensorboard(tmp_path, student, teacher, tokenizer, dataset, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # where TensorBoardCallback writes
    args = tiny_args(tmp_path / "run", max_steps=2, report_to="tensorboard")
    trainer = TIPTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    events = sorted((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events, "TensorBoardCallback wrote no event file"
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    # transformers' TensorBoardCallback puts the training logs under `train/`.
    expected = {f"train/{name}" for name in metric_names()}
    assert expected <= tags, f"missing: {sorted(expected - tags)}"
    logged = [entry for entry in trainer.state.log_history if "tip/kept_frac" in entry]
    assert [int(e["step"]) for e in logged] == [1, 2]
    for name in ("tip/q3/frac", "tip/kept_frac", "tip/tokens_eligible", "tip/divergence_threshold"):
        scalars = accumulator.Scalars(f"train/{name}")
        assert [s.step for s in scalars] == [1, 2]
        for scalar, entry in zip(scalars, logged):
            assert scalar.value == pytest.approx(entry[name], rel=1e-6, abs=1e-7), name
