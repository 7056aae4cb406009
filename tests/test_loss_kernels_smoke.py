"""`benchmarks/loss_kernels.py --tiny` runs on a CPU: trl-tip's kept-token loss and TRL's chunked kernel agree."""

import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import loss_kernels  # noqa: E402


@pytest.mark.slow
def test_loss_kernels_tiny_cpu(capsys):
    rows = loss_kernels.main(["--tiny"])
    assert [(r["kind"], r["kept"]) for r in rows] == [
        *(("loss fwd+bwd", share) for share in (1.0, 0.5, 0.2, 0.1)),
        ("signals (no grad)", 1.0),
    ]
    for row in rows:
        if row["kind"] == "loss fwd+bwd":
            assert row["loss_rel_diff"] < 1e-4 and row["grad_rel_diff"] < 1e-4
    table = loss_kernels.table(rows)
    assert table.startswith("| pass | kept |") and len(table.splitlines()) == 2 + len(rows)
    assert table in capsys.readouterr().out
