"""Two processes on CPU (gloo): thresholds, statistics and the loss normalisation agree with one process."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ddp_check.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    env["TRL_EXPERIMENTAL_SILENCE"] = "1"
    # A hang (e.g. a rank skipping a collective when it keeps no token) fails the test instead of blocking CI.
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=170)


def test_two_process_cpu_launch_matches_one_process(tmp_path):
    out = str(tmp_path)
    reference = _run([sys.executable, str(SCRIPT), "--reference", "--out", out, "--train_steps", "0"])
    assert reference.returncode == 0, reference.stdout + reference.stderr
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    result = _run([*launch, str(SCRIPT), "--out", out, "--train_steps", "2"])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for rule in ("all", "quadrants_q3", "tip", "q3_score", "rank0_keeps_nothing"):
        assert f"[rank 0/2] rule={rule}" in output and f"[rank 1/2] rule={rule}" in output, output
    # Rank 0 keeps no token while rank 1 keeps all of its: same collectives on both, loss and gradients of one process.
    kept_here = {
        rank: int(m.group(1))
        for rank in (0, 1)
        if (m := re.search(rf"\[rank {rank}/2\] rule=rank0_keeps_nothing rows=.*? kept here=(\d+) ", output))
    }
    assert kept_here.get(0) == 0 and kept_here.get(1, 0) > 0, output
    assert output.count("-> PASS") == 5, output
    for rule in ("quadrants_q3", "rank0_keeps_nothing"):
        assert (
            f"train() rule={rule}: 2 DDP steps with generation, finite loss=True, tip/* logs identical on all ranks=True"
            in output
        ), output
    assert "DDP CHECK PASSED" in output, output
