"""Two processes on CPU (gloo): thresholds, statistics and the loss normalisation agree with one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, free_port, launch_env


SCRIPT = ROOT / "benchmarks" / "ddp_check.py"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = launch_env()
    # A hang (e.g. a rank skipping a collective when it keeps no token) fails the test instead of blocking CI.
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=170)


@pytest.mark.slow
def test_two_process_cpu_launch_matches_one_process(tmp_path):
    out, report_path = str(tmp_path), tmp_path / "ddp.json"
    reference = _run([sys.executable, str(SCRIPT), "--reference", "--out", out, "--train_steps", "0"])
    assert reference.returncode == 0, reference.stdout + reference.stderr
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    result = _run([*launch, str(SCRIPT), "--out", out, "--train_steps", "2", "--json", str(report_path)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    report = json.loads(report_path.read_text())
    rules = {r["rule"]: r for r in report["rules"]}
    assert list(rules) == ["all", "quadrants_q3", "tip", "q3_score", "rank0_keeps_nothing"]
    for rule, r in rules.items():
        assert [p["rank"] for p in r["per_rank"]] == [0, 1], rule
        assert r["passed"] and r["same_thresholds"] and r["close_thresholds"] and r["same_stats"], r
    # Rank 0 keeps no token while rank 1 keeps all of its: same collectives on both, loss and gradients of one process.
    kept_here = [p["kept_here"] for p in rules["rank0_keeps_nothing"]["per_rank"]]
    assert kept_here[0] == 0 and kept_here[1] > 0, kept_here
    train = {t["rule"]: t for t in report["train"]}
    assert list(train) == ["quadrants_q3", "rank0_keeps_nothing"]
    for t in train.values():
        # 2 DDP steps with generation, finite loss, tip/* logs identical on all ranks.
        assert t["steps"] == 2 and t["finite"] and t["same_logs"] and t["passed"], t
    assert all(0.0 < frac < 1.0 for frac in train["rank0_keeps_nothing"]["kept_frac"])
    assert report["passed"] and "DDP CHECK PASSED" in output, output
