"""`benchmarks/loss_kernels.py --tiny` runs on a CPU: trl-tip's kept-token loss and TRL's chunked kernel agree."""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import loss_kernels  # noqa: E402


def test_loss_kernels_tiny_cpu(capsys):
    rows = loss_kernels.main(["--tiny"])
    assert [r["kind"] for r in rows].count("loss fwd+bwd") == 4
    for row in rows:
        if row["kind"] == "loss fwd+bwd":
            assert row["loss_rel_diff"] < 1e-4 and row["grad_rel_diff"] < 1e-4
    assert "| pass | kept |" in capsys.readouterr().out
