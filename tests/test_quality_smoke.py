"""The quality benchmark (benchmarks/quality) end to end on CPU with its --smoke settings, and its task's answers."""

import importlib.util
import json
import sys
from pathlib import Path


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


def test_smoke_run_writes_results_table_and_plot(tmp_path):
    run = _load("run")
    record = run.main(["--smoke", "--out", str(tmp_path)])
    rules = {r["rule"] for r in record["results"]}
    assert rules == {"GKD (all tokens)", "entropy_sample 0.5", "sstoken 0.6"}
    by_rule = {r["rule"]: r for r in record["results"]}
    assert by_rule["GKD (all tokens)"]["kept_share"] == 1.0
    assert 0.0 < by_rule["entropy_sample 0.5"]["kept_share"] < 1.0
    for r in record["results"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["tokens_kept"] > 0
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert len(saved["results"]) == 3 and "| entropy_sample 0.5 | 1 |" in saved["table"]
    assert (tmp_path / "quality.png").stat().st_size > 0
