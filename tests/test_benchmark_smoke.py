"""The memory/speed harness runs end to end on CPU with tiny shapes, every kind of row included (GKDTrainer, TRL's
DistillationTrainer, TIPTrainer default and fast paths, TIPDistillationTrainer), and skips rules it does not know."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest


def _load():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_speed.py"
    spec = importlib.util.spec_from_file_location("memory_speed", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_speed"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_memory_speed_tiny_cpu(capsys):
    bench = _load()
    rules = "gkd,dist,all,tip:0.2,dist/all,no_such_rule:0.6"
    results = bench.main(["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--rules", rules])
    out = capsys.readouterr().out
    assert "token_selection='no_such_rule' is not known" in out
    assert [r.rule for r in results] == ["GKDTrainer", "DistillationTrainer", "TIP all", "TIP tip 20%", "TIPDist all"]
    assert all(r.status == "ok" and r.step_s > 0 and r.tokens_per_step == 2 * (64 - 16) for r in results)
    assert math.isclose(results[2].kept_frac, 1.0) and 0.15 < results[3].kept_frac < 0.25
    assert math.isclose(results[4].kept_frac, 1.0)
    # Every ratio against both references (no peak memory on a CPU); the TIPDistillationTrainer table after the
    # main one, with only its rows.
    rows = bench.loss_rows(results)
    assert [row["rule"] for row in rows] == [r.rule for r in results]
    gkd, dist = rows[0], rows[1]
    assert gkd["shape"] == "2x64" and math.isnan(gkd["kept"]) and math.isnan(gkd["peak_gib"])
    assert math.isnan(gkd["peak_x_gkd"]) and math.isnan(gkd["peak_x_dist"])
    assert gkd["step_x_gkd"] == 1.0 and dist["step_x_dist"] == 1.0
    for row, r in zip(rows, results, strict=True):
        assert math.isclose(row["step_x_gkd"], r.step_s / results[0].step_s)
        assert math.isclose(row["step_x_dist"], r.step_s / results[1].step_s)
    assert [row["rule"] for row in bench.loss_rows(results, ("dist", "tip-dist"))] == [
        "DistillationTrainer",
        "TIPDist all",
    ]
    table, dist_table = bench.loss_table(results), bench.loss_table(results, trainers=("dist", "tip-dist"))
    assert "| 2x64 | GKDTrainer | — | — | — | — | " in table and "| 1.00 |" in table
    assert "| 2x64 | TIP tip 20% |" in table and "TIP tip 20%" not in dist_table
    assert f"{table}\n\nTIPDistillationTrainer against DistillationTrainer:\n{dist_table}\n" in out


@pytest.mark.slow
def test_memory_speed_tiny_cpu_generation(capsys, tmp_path):
    bench = _load()
    rules = "gkd,dist,entropy_sample:0.5,fast/entropy_sample:0.5,dist/entropy_sample:0.5,distfast/entropy_sample:0.5"
    argv = ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--grad-accum", "2", "--generation"]
    profile = ["--profile", "--profile-rules", "TIP fast entropy_sample 50%", "--profile-dir", str(tmp_path)]
    results = bench.main([*argv, "--rules", rules, *profile, "--json", str(tmp_path / "e2e.json")])
    out = capsys.readouterr().out
    assert [r.status for r in results] == ["ok"] * 6
    assert [r.trainer for r in results] == ["gkd", "dist", "tip", "tip-fast", "tip-dist", "tip-dist-fast"]
    # On CPU `fast_generation='auto'` takes the default path; the fast rows run the static-cache path (eager backend).
    assert [r.fast_path for r in results] == [None, None, False, True, False, True]
    assert results[2].rule == "TIP entropy_sample 50% (auto: dynamic)"
    for r in results:
        assert r.shape == "2x(16+8)" and r.grad_accum == 2
        # 2 micro-batches x 2 sequences x 8 sampled tokens (DistillationTrainer may stop a row at its EOS, id 1).
        assert r.tokens_per_step <= 32 and (r.trainer == "dist" or r.tokens_per_step == 32)
        assert 0 < r.generation_s < r.step_s and r.loss_s > 0 and r.decode_forwards > 0
    gkd, dist, default, fast, tip_dist, tip_dist_fast = results
    # GKD generates per micro-batch (2 calls of 8 forwards), the others once per step (8 forwards).
    assert gkd.decode_forwards == 16 and default.decode_forwards == fast.decode_forwards == 8
    assert tip_dist_fast.decode_forwards == 8 and tip_dist_fast.graphs_warmup >= 1 and tip_dist_fast.graphs_timed == 0
    # The fast path compiles during the warm-up and not again, although prompt lengths vary from step to step.
    assert fast.graphs_warmup >= 1 and fast.graphs_timed == 0
    # Same rows, same noise: on the CPU (float32) the fast path's first rollouts equal the default path's.
    assert fast.prefix_match == 8 and "share on average 8.0 of 8 leading tokens" in out
    assert all(math.isnan(r.prefix_match) for r in (gkd, dist, default, tip_dist))
    # Only the profiled row has a profile: its phases, generation included, and the step they add up to.
    assert [bool(r.profile_s) for r in results] == [False, False, False, True, False, False]
    assert fast.profile_s["generation"] > 0 and fast.profile_s["step"] > 0
    assert math.isclose(
        sum(v for k, v in fast.profile_s.items() if k not in ("step", "selection")), fast.profile_s["step"]
    )
    # The device-time table and the host-side (self CPU time) table of the profiled row.
    profiles = sorted(p.name for p in tmp_path.glob("profile_TIP_fast_*.txt"))
    assert len(profiles) == 2 and profiles[1] == profiles[0].replace(".txt", "_cpu.txt"), profiles
    assert "Self CPU" in (tmp_path / profiles[1]).read_text()
    # Launches and host reads per decode forward of the profiled generation (no CUDA runtime calls on a CPU; the stop
    # check reads a device value at every step).
    line = next(x for x in out.splitlines() if "per decode forward (8 in the step)" in x)
    assert "0.0 kernel launches, 0.00 CUDA graph launches, 0.00 synchronisations" in line
    assert float(line.split("synchronisations, ")[1].split(" host reads")[0]) >= 1
    rows = bench.generation_rows(results)
    assert [(row["shape"], row["grad_accum"], row["rule"]) for row in rows] == [
        ("2x(16+8)", 2, r.rule) for r in results
    ]
    assert rows[0]["tokens_x_gkd"] == 1.0 and rows[1]["tokens_x_dist"] == 1.0
    assert all(row["graphs_timed"] == r.graphs_timed for row, r in zip(rows, results, strict=True))
    table = bench.generation_table(results)
    assert "| 2x(16+8) | 2 | TIP fast entropy_sample 50% |" in table and table in out
    saved = json.loads((tmp_path / "e2e.json").read_text())
    assert [r["rule"] for r in saved["results"]] == [r.rule for r in results]


@pytest.mark.slow
def test_memory_speed_rows_decode_with_the_kv_cache_their_trainer_uses():
    """The harness's models decode as a Hub checkpoint does: TRL's DistillationTrainer (and TIPDistillationTrainer's
    default path, which runs TRL's generation) with a KV cache, one new token per decode forward; GKDTrainer, whose
    own generation config sets `use_cache=False` under gradient checkpointing, re-runs the whole sequence."""
    import argparse
    import tempfile

    import torch

    bench = _load()
    ns = argparse.Namespace(
        generation=True,
        prompt=8,
        prompt_jitter=2,
        grad_accum=1,
        vocab=64,
        seed=0,
        max_new_tokens=4,
        device="cpu",
        precision="bf16",
        chunk_size=None,
        pad_to_multiple_of=8,
        lora=None,
    )
    device = torch.device("cpu")
    tokenizer = bench.make_tokenizer(ns.vocab)
    student = bench.make_model("0.5B", ns.vocab, True, device, torch.float32, 0)
    teacher = bench.make_model("1.5B", ns.vocab, True, device, torch.float32, 1).eval()
    widths = {}
    for rule in bench.parse_rules("gkd,dist,distdyn/all,dyn/all"):
        seen = widths.setdefault(rule.label, [])

        def record(module, args, kwargs, _seen=seen):
            if not torch.is_grad_enabled():  # generation (the loss forwards run with grad)
                _seen.append(kwargs["input_ids"].size(1))

        with tempfile.TemporaryDirectory() as output_dir:
            trainer = bench.build_trainer(rule, student, teacher, tokenizer, ns, 2, output_dir)
            handle = student.register_forward_pre_hook(record, with_kwargs=True)
            try:
                bench.one_step(trainer, rule, bench.make_step(ns, 0, 2, 0, device), ns)
            finally:
                handle.remove()
    assert widths["DistillationTrainer"] == widths["TIPDist dynamic all"] == [8, 1, 1, 1]
    assert widths["TIP dynamic all"] == [8, 1, 1, 1]
    assert widths["GKDTrainer"] == [8, 9, 10, 11]


def test_model_shapes_are_the_released_configs():
    bench = _load()
    # Qwen/Qwen3-4B and Qwen/Qwen3-8B config.json: Qwen3-4B ties its embeddings, Qwen3-8B does not.
    released = {
        "qwen3-4b": (2560, 9728, True),
        "qwen3-8b": (4096, 12288, False),
    }
    for name, (hidden, intermediate, tied) in released.items():
        config = bench.model_config(name, 151_936, tiny=False)
        assert type(config).__name__ == "Qwen3Config"
        assert (config.hidden_size, config.intermediate_size, config.tie_word_embeddings) == (
            hidden,
            intermediate,
            tied,
        )
        assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (36, 32, 8)
        assert (config.head_dim, config.vocab_size, config.rope_parameters["rope_theta"]) == (128, 151_936, 1e6)
        tiny = bench.model_config(name, 512, tiny=True)
        assert (
            type(tiny).__name__ == "Qwen3Config" and tiny.tie_word_embeddings == tied and tiny.num_hidden_layers == 2
        )
    assert type(bench.model_config("0.5B", 151_936, tiny=False)).__name__ == "Qwen2Config"
    with pytest.raises(ValueError, match="Unknown model shape 'qwen3-14b': use one of 0.5B, 1.5B, qwen3-4b, qwen3-8b"):
        bench.model_config("qwen3-14b", 512, tiny=True)
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--device", "cpu", "--lora", "-1"])


def test_strip_adapters_gives_back_the_plain_student():
    """The rows share one student: each trainer wraps it with `get_peft_model`, and the row's end unwraps it, so
    the next trainer adapts the same plain model (same modules, same weights) again."""
    import torch
    from peft import get_peft_model

    bench = _load()
    student = bench.make_model("qwen3-4b", 512, True, torch.device("cpu"), torch.float32, seed=0)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    modules = [(name, type(m)) for name, m in student.named_modules()]
    ns = type("Args", (), {"lora": 4})()
    for _ in range(2):
        peft_model = get_peft_model(student, bench.lora_config(ns))
        trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        assert len(trainable) == 2 * 7 * 2  # layers x projections x (A, B)
        assert bench.strip_adapters(student) == 2 * 7
        assert [(name, type(m)) for name, m in student.named_modules()] == modules
        assert all(torch.equal(p, before[name]) for name, p in student.named_parameters())
    assert bench.strip_adapters(student) == 0


@pytest.mark.slow
def test_memory_speed_tiny_cpu_paper_pair_lora(capsys, monkeypatch):
    """`--student qwen3-4b --teacher qwen3-8b --lora R`: every row, of both TRL trainers and both trl-tip trainers,
    trains the same rank-R adapter from the same initial values on the frozen student."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    bench = _load()
    models, adapters = [], []
    make_model, restore_adapter = bench.make_model, bench.restore_adapter

    def recording_make_model(*args, **kwargs):
        models.append(make_model(*args, **kwargs))
        return models[-1]

    def recording_restore_adapter(trainer, ns):
        n = restore_adapter(trainer, ns)
        adapters.append({k: p.detach().clone() for k, p in trainer.model.named_parameters() if p.requires_grad})
        return n

    monkeypatch.setattr(bench, "make_model", recording_make_model)
    monkeypatch.setattr(bench, "restore_adapter", recording_restore_adapter)
    argv = ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1"]
    shapes = ["--student", "qwen3-4b", "--teacher", "qwen3-8b", "--lora", "4"]
    results = bench.main([*argv, *shapes, "--rules", "gkd,dist,all,tip:0.5,dist/entropy_sample:0.5"])
    out = capsys.readouterr().out
    assert "student=qwen3-4b (tiny)" in out and "teacher=qwen3-8b" in out and "lora=r4/alpha8 on q_proj+" in out
    assert [r.status for r in results] == ["ok"] * 5
    # Rank 4 on q (32->64), k, v (32->32), o (64->32), gate, up (32->64), down (64->32) of 2 layers: hand-counted.
    per_layer = 4 * ((32 + 64) + 2 * (32 + 32) + (64 + 32) + 2 * (32 + 64) + (64 + 32))
    assert [r.trainable_params for r in results] == [2 * per_layer] * 5
    assert all(r.tokens_per_step == 2 * (64 - 16) for r in results)
    assert math.isclose(results[2].kept_frac, 1.0) and 0.4 < results[3].kept_frac < 0.6
    # The same adapter at the start of every row, although each trainer built (and initialised) its own.
    assert len(adapters) == 5 and all(a.keys() == adapters[0].keys() for a in adapters)
    assert all(torch.equal(a[k], adapters[0][k]) for a in adapters[1:] for k in a)
    # The shared student is given back plain, its frozen base weights untouched by five rows of training.
    student, teacher = models
    assert not any(isinstance(m, BaseTunerLayer) for m in student.modules())
    fresh = make_model("qwen3-4b", 512, True, torch.device("cpu"), torch.float32, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), fresh.parameters(), strict=True))
    assert teacher.lm_head.weight is not teacher.model.embed_tokens.weight


@pytest.mark.slow
def test_gpu_session_script_dry_run(tmp_path):
    """benchmarks/gpu_session.sh end to end on CPU (BENCH_ARGS shrinks both steps): both steps run with their own
    models, every row is measured, and OUT holds the six files it promises, the summary table last."""
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
    bench_args = "--tiny --device cpu --shapes 2x64 --steps 1 --warmup 1 --rules dist,dist/tip:0.2"
    env = {**os.environ, "PYTHON": sys.executable, "BENCH_ARGS": bench_args}
    done = subprocess.run(["bash", str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    names = {"env.txt", "loss_4x2048.json", "loss_4x2048.log", "paper_4x4096_lora64.json", "paper_4x4096_lora64.log"}
    assert {p.name for p in tmp_path.iterdir()} == names | {"summary.md"}
    loss, paper = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("loss_4x2048", "paper_4x4096_lora64"))
    assert "student=0.5B (tiny)" in loss["header"] and "lora=" not in loss["header"]
    assert "student=qwen3-4b (tiny)" in paper["header"] and "teacher=qwen3-8b" in paper["header"]
    assert "lora=r64/alpha128" in paper["header"]
    for data in (loss, paper):
        assert [(r["rule"], r["status"]) for r in data["results"]] == [
            ("DistillationTrainer", "ok"),
            ("TIPDist tip 20%", "ok"),
        ]
    summary = (tmp_path / "summary.md").read_text()
    assert "## loss_4x2048" in summary and "## paper_4x4096_lora64" in summary
    assert "| DistillationTrainer | ok | — | — | — | " in summary and "| 1.00 |" in summary
    assert "exit 0" in done.stdout and "timed out" not in done.stdout
