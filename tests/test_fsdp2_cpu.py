"""Two processes on CPU (gloo) with FSDP2 (`fully_shard`): both trainers give the one-process loss and gradients."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "fsdp2_cpu_check.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_two_processes_match_one_process():
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    env["TRL_EXPERIMENTAL_SILENCE"] = "1"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(SCRIPT)]
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for trainer in ("gkd", "distillation"):
        for sharding in ("accelerate", "reshard_all"):
            assert f"| {trainer} | all | {sharding} | PASS |" in output, output
    assert output.count("| PASS |") == 12 and "FAIL" not in output, output
    assert "FSDP2 CPU CHECK PASSED" in output, output
