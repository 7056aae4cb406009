"""The quality benchmark (benchmarks/quality) end to end on CPU with its --smoke settings, and its task's answers."""

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest


QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"


def _load(name):
    sys.path.insert(0, str(QUALITY))
    try:
        spec = importlib.util.spec_from_file_location(f"quality_{name}", QUALITY / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(QUALITY))


def test_chain_of_thought_is_correct_and_splits_are_disjoint():
    task = _load("task")
    assert task.chain_of_thought(347, 285) == "7+5+0=12 4+8+1=13 3+2+1=06 =632"
    assert task.answer_of("1+2+0=03 =3") == "3"
    assert task.answer_of("no answer") is None
    train, test = task.make_splits(300, 100, seed=0)
    seen = {row["messages"][0]["content"] for row in train}
    assert not seen & {row["messages"][0]["content"] for row in test}
    for row in list(train) + list(test):
        a, b = map(int, row["messages"][0]["content"].split("+"))
        assert task.answer_of(row["messages"][1]["content"]) == row["answer"] == str(a + b)
    assert task.make_splits(300, 100, seed=0)[1]["answer"] == test["answer"]


@pytest.mark.slow
def test_smoke_run_writes_results_table_and_plot(tmp_path):
    run = _load("run")
    record = run.main(
        ["--smoke", "--out", str(tmp_path), "--add_rule", "random 0.1", "random", '{"keep_ratio": 0.1}',
         "--rules", "GKD (all tokens)", "entropy_sample 0.5", "sstoken 0.6", "random 0.1",
         "--lr_for", "random 0.1=1e-3"]
    )  # fmt: skip
    by_rule = {r["rule"]: r for r in record["results"]}
    assert set(by_rule) == {"GKD (all tokens)", "entropy_sample 0.5", "sstoken 0.6", "random 0.1"}
    assert by_rule["GKD (all tokens)"]["kept_share"] == 1.0
    assert by_rule["GKD (all tokens)"]["kept_by_position"] is None
    assert 0.0 < by_rule["entropy_sample 0.5"]["kept_share"] < 1.0
    assert by_rule["random 0.1"]["lr"] == 1e-3 and by_rule["sstoken 0.6"]["lr"] == 5e-4
    for r in record["results"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["tokens_kept"] > 0
        assert len(r["samples"]) == run.SAMPLES and all(isinstance(t, str) for t in r["samples"])
    positions = by_rule["entropy_sample 0.5"]["kept_by_position"]
    assert positions and all(0.0 <= v <= 1.0 for v in positions.values())
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert len(saved["results"]) == 4 and "| entropy_sample 0.5 | 0.0005 | 1 |" in saved["table"]
    assert "| random 0.1 | 0.001 | 1 |" in saved["table"] and "| seed 0 |" in saved["table"]
    assert (tmp_path / "quality.png").stat().st_size > 0


@pytest.mark.slow
def test_parallel_jobs_give_the_same_results_as_one_process(tmp_path, monkeypatch):
    # The spawned workers import the script by name, so it is imported as `run` from a path they inherit.
    monkeypatch.syspath_prepend(str(QUALITY))
    monkeypatch.delitem(sys.modules, "run", raising=False)
    run = importlib.import_module("run")
    common = ["--smoke", "--rules", "TIP all", "random 0.5", "--seeds", "0"]
    serial = run.main([*common, "--out", str(tmp_path / "serial")])
    parallel = run.main([*common, "--out", str(tmp_path / "parallel"), "--jobs", "2"])
    assert [r["rule"] for r in parallel["results"]] == [r["rule"] for r in serial["results"]]
    for a, b in zip(serial["results"], parallel["results"], strict=True):
        assert a["tokens_kept"] == b["tokens_kept"] and a["samples"] == b["samples"]
        assert abs(a["last_loss"] - b["last_loss"]) < 1e-4


def test_bad_rule_options_are_refused(capsys):
    run = _load("run")
    for argv, message in [
        (["--lr_for", "nope=1e-3"], "--lr_for must be NAME=LR"),
        (["--add_rule", "x", "random", "[1]"], "JSON must be an object"),
        (["--add_rule", "TIP all", "random", "{}"], "--add_rule names must differ"),
        (["--rules", "nope"], "unknown"),
        (["--jobs", "0"], "--jobs must be at least 1"),
    ]:
        try:
            run.parse(argv)
        except SystemExit:
            pass
        else:
            raise AssertionError(f"{argv} was accepted")
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_committed_gpu_results_reproduce_the_tables_in_the_docs(tmp_path):
    """docs/quality.md quotes tables that `--merge` rebuilds from the committed JSON, line for line."""
    run = _load("run")
    results = QUALITY / "results" / "gpu"
    doc = (QUALITY.parents[1] / "docs" / "quality.md").read_text()
    for folders in (["main", "more", "more2"], ["lowlr"], ["variants"]):
        record = run.main(["--merge", *(str(results / f) for f in folders), "--out", str(tmp_path / folders[0])])
        lines = [line for line in record["table"].splitlines() if line.startswith("| ") and "---" not in line]
        assert len(lines) > 4
        for line in lines:
            assert line in doc, line
    with_q3 = run.main(["--merge", str(results / "main"), "--out", str(tmp_path / "q3")])
    q3 = [r for r in with_q3["results"] if r["rule"] == "quadrants Q3"]
    assert len(q3) == 5 and all(r["accuracy"] == 0.0 for r in q3)


@pytest.mark.slow
def test_merge_refuses_other_settings_and_duplicate_runs(tmp_path):
    run = _load("run")
    results = QUALITY / "results" / "gpu"
    with pytest.raises(ValueError, match="settings"):
        run.main(["--merge", str(results / "main"), str(results / "lowlr"), "--out", str(tmp_path / "a")])
    with pytest.raises(ValueError, match="already in an earlier folder"):
        run.main(["--merge", str(results / "main"), str(results / "main"), "--out", str(tmp_path / "b")])
