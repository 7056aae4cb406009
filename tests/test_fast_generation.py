"""`fast_generation` on both trainers (`trl_tip.trainers.rollouts`): the automatic decision and its one log line, the
refusals, the compile-failure fallback, and `TIPDistillationTrainer`'s fast path under `DistillationTrainer`'s semantics.

The fast path's compiled decode needs CUDA; on CPU it runs with its static KV cache and dynamo's eager backend (the
same code path, transformers told to compile on CPU), which is what these tests use where they run it.
"""

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import dist_args, left_tokenizer, prompt_dataset
from transformers import GenerationConfig
from transformers.generation import CompileConfig

from trl_tip import TIPConfig, TIPDistillationConfig, TIPDistillationTrainer
from trl_tip._compat import DistillationTrainer
from trl_tip.generation import StepGenerator, is_compile_failure, parse_fast_generation
from trl_tip.toy import make_model
from trl_tip.trainers import rollouts
from trl_tip.trainers.rollouts import resolve_fast_generation, unsupported_sampling_options


def eager_compile_config() -> CompileConfig:
    config = CompileConfig(backend="eager", fullgraph=False, dynamic=False, mode=None)
    config._compile_all_devices = True  # private transformers flag: compile on CPU (tests only)
    return config


def make_trainer(tmp_path, student=None, **overrides):
    tokenizer = left_tokenizer()
    student = student if student is not None else make_model(tokenizer, 32, 1, seed=1)
    teacher = make_model(tokenizer, 48, 1, seed=2)
    return TIPDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=dist_args(tmp_path, **overrides),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )


def install_cpu_fast_path(trainer) -> StepGenerator:
    """The generator `fast_generation` builds on a GPU, with the eager backend standing in for inductor."""
    args = trainer.args
    trainer.tip_generator = StepGenerator(
        trainer.generation_config,
        seed=args.seed,
        batch_size=args.per_device_train_batch_size * args.gradient_accumulation_steps,
        pad_to_multiple_of=8,
        static_cache=True,
        compile_config=eager_compile_config(),
    )
    return trainer.tip_generator


def tokenized_prompts(trainer, n=4):
    prompts = [row["prompt"] for row in prompt_dataset(n)]
    prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
    return prompt_ids


@pytest.fixture
def info_logs(caplog):
    """Records of `trl_tip.trainers.rollouts` at INFO."""
    with caplog.at_level(logging.INFO, logger=rollouts.__name__):
        yield caplog


def decisions(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Generation:")]


# ------------------------------------------------------------------ the option


def test_fast_generation_option_is_parsed_and_validated(tmp_path):
    assert [parse_fast_generation(v) for v in ("auto", "AUTO", "true", "False", True, False)] == [
        "auto",
        "auto",
        True,
        False,
        True,
        False,
    ]
    for bad in ("fast", 1, None):
        with pytest.raises(ValueError, match="fast_generation must be one of 'auto', True or False"):
            parse_fast_generation(bad)
    assert dist_args(tmp_path).fast_generation == "auto"
    assert TIPConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none").fast_generation == "auto"
    assert dist_args(tmp_path, fast_generation="false").fast_generation is False
    with pytest.raises(ValueError, match="fast_generation must be one of"):
        dist_args(tmp_path, fast_generation="yes")
    with pytest.raises(ValueError, match="fast_generation=True needs a CUDA device"):
        dist_args(tmp_path, fast_generation=True)
    with pytest.raises(ValueError, match="generation_pad_to_multiple_of must be a positive integer"):
        dist_args(tmp_path, generation_pad_to_multiple_of=0)
    assert isinstance(dist_args(tmp_path), TIPDistillationConfig)


def test_unsupported_sampling_options_are_named():
    trl_like = GenerationConfig(
        max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.0,
        pad_token_id=0, bos_token_id=None, eos_token_id=[1, 2], cache_implementation=None, disable_compile=True,
    )  # fmt: skip
    assert unsupported_sampling_options(trl_like) == []
    trl_like.repetition_penalty = 1.2
    trl_like.no_repeat_ngram_size = 3
    assert unsupported_sampling_options(trl_like) == ["no_repeat_ngram_size=3", "repetition_penalty=1.2"]
    assert unsupported_sampling_options(GenerationConfig(max_new_tokens=4, do_sample=False)) == ["do_sample=False"]
    assert unsupported_sampling_options(GenerationConfig(max_new_tokens=4, do_sample=True, num_beams=2)) == [
        "num_beams=2"
    ]


# ------------------------------------------------------------------ the decision


def fake_trainer(device="cuda", fsdp=False):
    return SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device(device), unwrap_model=lambda m: m), is_fsdp_enabled=fsdp
    )


def test_auto_takes_the_fast_path_only_where_it_is_safe(info_logs):
    model = make_model(left_tokenizer(), 32, 1)
    assert resolve_fast_generation(fake_trainer(), "auto", [("student", model)]) is True
    assert resolve_fast_generation(fake_trainer("cpu"), "auto", [("student", model)]) is False
    assert resolve_fast_generation(fake_trainer(fsdp=True), "auto", [("student", model)]) is False
    assert resolve_fast_generation(fake_trainer(), "auto", [("student", model)], ["TRL's vLLM generates"]) is False
    assert resolve_fast_generation(fake_trainer(), False, [("student", model)]) is False
    model._can_compile_fullgraph = False  # an architecture transformers cannot compile with a static cache
    assert resolve_fast_generation(fake_trainer(), "auto", [("student", model)]) is False
    lines = decisions(info_logs)
    assert len(lines) == 6  # one line per decision, each with its reason
    assert lines[0].startswith("Generation: the fast path (fast_generation='auto')")
    assert "it needs a CUDA device" in lines[1] and "sharded by FSDP" in lines[2] and "vLLM" in lines[3]
    assert lines[4] == "Generation: the default path (fast_generation=False)."
    assert "cannot compile Qwen2ForCausalLM with a static cache" in lines[5]


def test_fast_generation_true_refuses_with_the_reason():
    model = make_model(left_tokenizer(), 32, 1)
    for trainer, blockers, reason in (
        (fake_trainer("cpu"), [], "the student: it needs a CUDA device"),
        (fake_trainer(fsdp=True), [], "sharded by FSDP"),
        (fake_trainer(), ["tool calling runs TRL's multi-turn generation loop"], "tool calling"),
    ):
        with pytest.raises(ValueError, match=f"fast_generation=True cannot be used here: .*{reason}"):
            resolve_fast_generation(trainer, True, [("student", model)], blockers)


def test_distillation_trainer_decides_once_and_refuses_what_it_cannot_reproduce(tmp_path, info_logs, monkeypatch):
    trainer = make_trainer(tmp_path)  # auto on CPU: TRL's generation
    assert trainer.tip_generator is None
    assert decisions(info_logs) == [
        "Generation: the default path (fast_generation='auto'): the student: it needs a CUDA device (torch.compile "
        "with CUDA graphs); this run is on cpu."
    ]
    # As on a GPU: the device check passes, so auto builds the fast path (static cache, compiled decode step).
    monkeypatch.setattr(rollouts, "fast_generation_problem", lambda model, device: None)
    info_logs.clear()
    trainer = make_trainer(tmp_path)
    assert trainer.tip_generator is not None and trainer.tip_generator.static_cache
    assert trainer.tip_generator.compile_config.mode == "reduce-overhead"
    assert len(decisions(info_logs)) == 1 and "the fast path" in decisions(info_logs)[0]
    # A sampling option the fast path does not implement: auto keeps TRL's generation, True refuses.
    info_logs.clear()
    trainer = make_trainer(tmp_path, generation_kwargs={"repetition_penalty": 1.3})
    assert trainer.tip_generator is None
    assert "does not implement the generation option(s) repetition_penalty=1.3" in decisions(info_logs)[0]
    monkeypatch.setattr(TIPDistillationConfig, "validate_generation_arguments", lambda self: None)  # use_cpu check
    with pytest.raises(ValueError, match="fast_generation=True cannot be used here: .*repetition_penalty=1.3"):
        make_trainer(tmp_path, fast_generation=True, generation_kwargs={"repetition_penalty": 1.3})


# ------------------------------------------------------------------ TIPDistillationTrainer's fast path


def eos_prone_student(eos_id: int = 3, bias: float = 3.0):
    """The toy student with an `lm_head` bias towards EOS, so that rows end at different lengths."""
    student = make_model(left_tokenizer(), 32, 1, seed=1)
    head = student.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[eos_id] = bias
    student.lm_head = biased
    return student


def test_fast_path_returns_trl_completions_sampled_batch_invariantly(tmp_path):
    trainer = make_trainer(tmp_path, student=eos_prone_student(), max_completion_length=12, temperature=0.9, top_k=40)
    prompt_ids = tokenized_prompts(trainer, n=5)
    generator = install_cpu_fast_path(trainer)
    trainer.model.train()
    fast = trainer._generate_single_turn(prompt_ids, None, {})
    assert generator.num_calls == 2  # 5 rows, 4 per call: a full chunk and a filled one
    eos = set(trainer.eos_token_ids)
    assert len(fast) == 5
    for row in fast:
        # TRL's format: the completion up to and including its first EOS, or max_completion_length tokens.
        assert 1 <= len(row) <= 12 and not eos & set(row[:-1])
        assert row[-1] in eos or len(row) == 12
    assert len({len(row) for row in fast}) > 1 and any(row[-1] in eos for row in fast)  # rows end at their EOS
    # The samples are the eager dynamic-cache sampler's (same noise keys), row by row, however the rows are batched.
    reference = StepGenerator(generator.sampling_config, seed=trainer.args.seed, pad_to_multiple_of=8)
    trainer.tip_generator = reference
    trainer._tip_generation_step = None
    assert trainer._generate_single_turn(prompt_ids, None, {}) == fast
    trainer._tip_generation_step = None
    assert [trainer._generate_single_turn([ids], None, {})[0] for ids in prompt_ids[:1]] == fast[:1]
    # TRL's own sampling options reach the sampler: another temperature samples differently.
    assert generator.sampling_config.temperature == 0.9 and generator.sampling_config.top_k == 40


def test_fast_path_keys_training_and_evaluation_apart(tmp_path):
    trainer = make_trainer(tmp_path)
    install_cpu_fast_path(trainer)
    prompt_ids = tokenized_prompts(trainer, n=2)
    trainer.model.train()
    first = trainer._generate_single_turn(prompt_ids, None, {})
    again = trainer._generate_single_turn(prompt_ids, None, {})  # a second call in the same step: new rows
    trainer.model.eval()
    evaluation = trainer._generate_single_turn(prompt_ids, None, {})
    assert trainer._tip_generation_step == ("eval", rollouts.DistillationFastGeneration.EVAL_STEP_OFFSET)
    assert first != again and first != evaluation
    trainer.model.train()
    trainer._tip_generation_step = None  # a resumed run at the same step samples what the first call did
    assert trainer._generate_single_turn(prompt_ids, None, {}) == first


def test_fast_path_trains_with_trl_buffering(tmp_path):
    trainer = make_trainer(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2)
    generator = install_cpu_fast_path(trainer)
    trainer.train()
    # One generation per optimizer step (TRL's buffer serves both micro-batches), 4 rows in one call.
    assert generator.num_calls == 2 and generator.num_cache_builds == 1
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(log["loss"])) for log in logs)
    assert all(0 < log["completions/mean_length"] <= 6 for log in logs)  # TRL's completion metrics still logged


def test_images_and_tools_go_through_trl(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    generator = install_cpu_fast_path(trainer)
    calls = []
    monkeypatch.setattr(DistillationTrainer, "_generate_single_turn", lambda self, *a, **k: calls.append(a) or [[1]])
    prompt_ids = tokenized_prompts(trainer, n=1)
    assert trainer._generate_single_turn(prompt_ids, [["image"]], {}) == [[1]]
    assert trainer._generate_single_turn(prompt_ids, None, {"pixel_values": torch.zeros(1)}) == [[1]]
    assert trainer._generate_single_turn(prompt_ids, None, {}, has_tool_images=True) == [[1]]
    assert len(calls) == 3 and generator.num_calls == 0


# ------------------------------------------------------------------ compilation failures


def test_a_compile_failure_falls_back_with_a_warning(tmp_path, caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("inductor could not compile this graph")

    trainer = make_trainer(tmp_path)
    config = eager_compile_config()
    config.backend = broken_backend
    generator = StepGenerator(
        trainer.generation_config, seed=0, batch_size=4, pad_to_multiple_of=8, static_cache=True, compile_config=config
    )
    prompt_ids = tokenized_prompts(trainer, n=3)
    trainer.tip_generator = generator
    trainer.model.train()
    with caplog.at_level(logging.WARNING, logger="trl_tip.generation"):
        got = trainer._generate_single_turn(prompt_ids, None, {})
    warnings = [r.getMessage() for r in caplog.records if "compiled decode step failed" in r.getMessage()]
    assert len(warnings) == 1 and "BackendCompilerFailed" in warnings[0]
    assert generator.num_compile_failures == 1 and generator.compile_config is None and not generator.static_cache
    trainer.tip_generator = StepGenerator(trainer.generation_config, seed=0, pad_to_multiple_of=8)
    trainer._tip_generation_step = None
    assert trainer._generate_single_turn(prompt_ids, None, {}) == got  # the same samples


def test_is_compile_failure():
    from torch._dynamo.exc import BackendCompilerFailed

    assert is_compile_failure(BackendCompilerFailed(lambda: None, RuntimeError("boom"), None))
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as oom:
            raise BackendCompilerFailed(lambda: None, oom, None) from oom
    except BackendCompilerFailed as exc:
        assert is_compile_failure(exc)  # dynamo's own error comes first in the chain
    assert not is_compile_failure(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_compile_failure(ValueError("a bad prompt"))


def _static_layers_store_values_in_their_own_dtype() -> bool:
    """Whether the installed transformers allocates a static layer's values in their dtype (5.25) or the keys' (5.17)."""
    from transformers import Qwen2Config, StaticCache

    config = Qwen2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    layer = StaticCache(config=config, max_cache_len=2).layers[0]
    layer.lazy_initialization(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16))
    return layer.values.dtype == torch.bfloat16


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_static_cache_keeps_one_dtype_whatever_autocast_the_caller_has(tmp_path, autocast_dtype):
    # The static cache takes its dtypes from the first states it stores; every call decodes under the generator's one
    # autocast state, and the cache casts what it is given to its dtypes (`_compat.static_kv_cache`: transformers 5.17
    # stored values in the keys' dtype and raised index_copy_'s dtype error on an H100 with float32 weights, bf16).
    trainer = make_trainer(tmp_path)
    generator = install_cpu_fast_path(trainer)
    generator.autocast_dtype = autocast_dtype
    prompt_ids = tokenized_prompts(trainer, n=2)
    trainer.model.train()
    trainer._generate_single_turn(prompt_ids, None, {})
    trainer._tip_generation_step = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trainer._generate_single_turn(prompt_ids, None, {})
    trainer._tip_generation_step = None
    with torch.autocast("cpu", enabled=False):
        trainer._generate_single_turn(prompt_ids, None, {})
    ((cache, _),) = generator._caches.values()
    # (The values are v_proj's output, in the autocast dtype; the keys are promoted by the float32 rotary embedding.
    # A transformers release that allocates the values in the keys' dtype stores them as float32, cast.)
    values_dtype = autocast_dtype or torch.float32
    if not _static_layers_store_values_in_their_own_dtype():
        values_dtype = torch.float32
    assert {layer.values.dtype for layer in cache.layers} == {values_dtype}
    assert generator.num_cache_builds == 1


def test_the_fast_path_decodes_under_the_accelerators_mixed_precision():
    config = GenerationConfig(max_new_tokens=4, pad_token_id=0, eos_token_id=1)
    args = SimpleNamespace(seed=0, generation_pad_to_multiple_of=8)

    def built(native_amp, mixed_precision, fast=True):
        accelerator = SimpleNamespace(native_amp=native_amp, mixed_precision=mixed_precision, process_index=3)
        return rollouts.build_step_generator(config, args, accelerator, batch_size=2, fast=fast)

    assert built(True, "bf16").autocast_dtype is torch.bfloat16
    assert built(True, "fp16").autocast_dtype is torch.float16
    assert built(False, "no").autocast_dtype is None  # full precision: the model's own dtype
    assert built(False, "bf16").autocast_dtype is None  # DeepSpeed: the weights are cast, no autocast
    dynamic = built(True, "bf16", fast=False)
    assert dynamic.autocast_dtype is None and dynamic.process_index == 3  # the default path keeps the caller's
