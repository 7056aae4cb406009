"""The memory/speed harness runs end to end on CPU with tiny shapes, and skips rules the package does not know."""

import importlib.util
import math
import sys
from pathlib import Path


def _load():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_speed.py"
    spec = importlib.util.spec_from_file_location("memory_speed", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_speed"] = module
    spec.loader.exec_module(module)
    return module


def test_memory_speed_tiny_cpu(capsys):
    bench = _load()
    results = bench.main(
        ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--rules", "gkd,all,tip:0.2,no_such_rule:0.6"]
    )
    out = capsys.readouterr().out
    assert "token_selection='no_such_rule' is not known" in out
    assert [r.rule for r in results] == ["GKDTrainer (all tokens)", "TIP all", "TIP tip 20%"]
    assert all(r.status == "ok" and r.step_s > 0 and r.tokens_per_step == 2 * (64 - 16) for r in results)
    assert math.isclose(results[1].kept_frac, 1.0) and 0.15 < results[2].kept_frac < 0.25
    assert "| 2x64 | no | TIP tip 20% |" in out


def test_memory_speed_tiny_cpu_generation():
    bench = _load()
    results = bench.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--rules",
            "gkd,entropy_sample:0.5",
            "--generation",
        ]
    )
    assert [r.status for r in results] == ["ok", "ok"]
    # 2 sequences x 8 sampled tokens, each predicted from the position before it.
    assert all(r.tokens_per_step == 2 * 8 and r.shape == "2x(16+8)" for r in results)
