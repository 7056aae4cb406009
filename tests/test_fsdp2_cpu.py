"""Two processes on CPU (gloo) with FSDP2 (`fully_shard`): both trainers give the one-process loss and gradients."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "fsdp2_cpu_check.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    env["TRL_EXPERIMENTAL_SILENCE"] = "1"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(SCRIPT)]
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
