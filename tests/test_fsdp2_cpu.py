"""Two processes on CPU (gloo) with FSDP2 (`fully_shard`): both trainers give the one-process loss and gradients."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, free_port, launch_env


SCRIPT = ROOT / "benchmarks" / "fsdp2_cpu_check.py"


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process(tmp_path):
    env = launch_env()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(SCRIPT)]
    result = subprocess.run(
        [*launch, "--json", str(tmp_path / "fsdp2.json")], env=env, capture_output=True, text=True, timeout=240
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    report = json.loads((tmp_path / "fsdp2.json").read_text())
    assert report["world_size"] == 2
    checked = [(r["trainer"], r["rule"], r["sharding"]) for r in report["rows"]]
    assert checked == [
        (trainer, rule, sharding)
        for trainer in ("gkd", "distillation")
        for rule in ("all", "entropy_topk", "quadrants_q3")
        for sharding in ("accelerate", "reshard_all")
    ]
    failed = [r for r in report["rows"] if not r["passed"]]
    assert not failed and report["passed"], failed
    assert "FSDP2 CPU CHECK PASSED" in output, output
