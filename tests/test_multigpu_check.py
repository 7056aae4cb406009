"""benchmarks/multigpu_check.py at world size 1 on the CPU: the logic of the sharded-config check (the one-process
reference, the fixed-batch loss and gradient, checkpoint save + resume with the selection state), and DeepSpeed's
ZeRO-3 engine itself where deepspeed is installed (its CPU accelerator runs on gloo)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "multigpu_check.py"
RULES = ("all", "tip:0.5", "q3_score:0.1")


def _check_module():
    spec = importlib.util.spec_from_file_location("multigpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    env.update(TRL_EXPERIMENTAL_SILENCE="1", **(extra_env or {}))
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=420)


def _assert_rows(output: str, label: str) -> None:
    for trainer in ("gkd", "distillation"):
        for rule in RULES:
            row = next(
                (line for line in output.splitlines() if line.startswith(f"| {label} | 1 | {trainer} | {rule} |")),
                None,
            )
            assert row is not None and row.endswith("| PASS |"), output[-4000:]
            assert "state=True, step-3 logs equal=True" in row, row
    assert f"MULTIGPU CHECK {label} gkd,distillation PASSED" in output, output[-4000:]


def test_fixed_batch_is_the_same_for_both_trainers_and_long_enough_for_q3_score():
    check = _check_module()
    gkd, dist = check._fixed_batch("gkd", 128), check._fixed_batch("distillation", 128)
    assert torch.equal(gkd["input_ids"], torch.cat([dist["prompt_ids"], dist["completion_ids"]], 1))
    completion_labels = gkd["labels"][:, dist["prompt_ids"].size(1) :]
    assert torch.equal(completion_labels != -100, dist["completion_mask"].bool())
    assert (gkd["labels"][:, : dist["prompt_ids"].size(1)] == -100).all()
    # q3_score keeps floor(0.1 n) tokens of each rollout: every row must keep at least one.
    assert int(dist["completion_mask"].sum(1).min()) >= 10


def test_sharded_weights_reads_what_accelerate_launch_sets(monkeypatch):
    check = _check_module()
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(name, raising=False)
    assert not check._sharded_weights()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert not check._sharded_weights()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert check._sharded_weights()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert check._sharded_weights()


@pytest.mark.slow
def test_world_size_one_launch_matches_reference_and_resumes(tmp_path):
    out = str(tmp_path)
    common = ["--trainer", "gkd,distillation", "--out", out, "--cpu", "--rules", ",".join(RULES)]
    reference = _run([sys.executable, str(SCRIPT), "--reference", *common])
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(SCRIPT)]
    result = _run([*launch, *common, "--resume", "--label", "ddp"])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    _assert_rows(output, "ddp")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (CPU accelerator, gloo)")
def test_deepspeed_zero3_world_size_one_on_cpu(tmp_path):
    if shutil.which("accelerate") is None:
        pytest.skip("needs the accelerate command")
    out = str(tmp_path)
    common = ["--trainer", "gkd,distillation", "--out", out, "--cpu", "--rules", ",".join(RULES)]
    reference = _run([sys.executable, str(SCRIPT), "--reference", *common])
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    launch = ["accelerate", "launch", "--config_file", str(ROOT / "recipes/accelerate/deepspeed_zero3.yaml")]
    launch += ["--mixed_precision", "no", "--num_processes", "1", "--main_process_port", str(_free_port())]
    result = _run([*launch, str(SCRIPT), *common, "--resume", "--label", "deepspeed_zero3"])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "DeepSpeed ZeRO-3: 3 steps" in output, output[-4000:]
    _assert_rows(output, "deepspeed_zero3")
