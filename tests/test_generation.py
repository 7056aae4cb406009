"""On-policy generation once per optimizer step (`trl_tip.generation`, `TIPTrainer._generate_on_policy`).

The sampler: its hash against an independent uint32 implementation, its Gumbel noise, and its samples against
softmax(logits / T) after top-k. The step generator: GKD's tensors, the same rollouts however the rows are batched
(one call, per micro-batch, split micro-batches), with a static cache and with a compiled decode step (dynamo's eager
backend on CPU) that compiles once for prompt lengths within a bucket. The trainer: the same training whatever
`per_device_generation_batch_size`, GKD's lmbda/seq_kd draws, gradient checkpointing off during generation, exact
resume, and `fast_generation` refused where it cannot run.
"""

import copy
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_args
from transformers import GenerationConfig
from transformers.generation import CompileConfig, TemperatureLogitsWarper, TopKLogitsWarper

from trl_tip import TIPTrainer, _compat, metric_names
from trl_tip._compat import GKDTrainer, forward_hooks
from trl_tip.generation import (
    GumbelSampler,
    StepGenerator,
    fast_generation_problem,
    gumbel_from_hash,
    mix32,
    rollout_tensors,
    row_keys,
    sampling_warpers,
)
from trl_tip.toy import make_model


# ------------------------------------------------------------------ the hash and the noise


def _mix32_uint32(x: np.ndarray) -> np.ndarray:
    """The same hash in numpy uint32 arithmetic (multiplication wraps modulo 2**32)."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x = x * np.uint32(0x21F0AAAD)
    x ^= x >> np.uint32(15)
    x = x * np.uint32(0x735A2D97)
    x ^= x >> np.uint32(15)
    return x


def test_mix32_matches_uint32_arithmetic_and_python_ints():
    values = np.array([0, 1, 2, 0xFFFFFFFF, 0x80000000, 123456789, 0xDEADBEEF], dtype=np.uint64)
    got = mix32(torch.tensor(values.astype(np.int64)))
    assert got.dtype == torch.int64 and int(got.min()) >= 0 and int(got.max()) <= 0xFFFFFFFF
    np.testing.assert_array_equal(got.numpy(), _mix32_uint32(values).astype(np.int64))
    assert [mix32(int(v)) for v in values] == got.tolist()
    assert mix32(0) == 0  # xor-shift-multiply fixes 0; keys never feed a bare 0 (the seed/step mix comes first)


def test_row_keys_depend_on_every_coordinate():
    rows = torch.arange(4)
    base = row_keys(0, 0, 0, rows)
    assert len(set(base.tolist())) == 4
    for other in (
        row_keys(1, 0, 0, rows),
        row_keys(0, 1, 0, rows),
        row_keys(0, 0, 1, rows),
        row_keys(2**40, 0, 0, rows),
    ):
        assert not set(other.tolist()) & set(base.tolist())
    # A row's key depends on its own index only, not on the other rows of the call.
    assert torch.equal(row_keys(0, 0, 0, rows[2:]), base[2:])


def test_gumbel_noise_has_the_gumbel_distribution():
    hashed = mix32(torch.arange(400_000, dtype=torch.int64) ^ 0x5BD1E995)
    g = gumbel_from_hash(hashed).double()
    assert torch.isfinite(g).all()
    assert g.mean().item() == pytest.approx(0.5772156649, abs=0.01)  # Euler-Mascheroni
    assert g.var().item() == pytest.approx(np.pi**2 / 6, rel=0.02)
    # Extremes: u = 2**-24 and 1 - 2**-24, both exact in float32, so the noise stays finite.
    edges = gumbel_from_hash(torch.tensor([0, 0xFFFFFFFF]))
    expected = [-np.log(-np.log(2.0**-24)), -np.log(-np.log1p(-(2.0**-24)))]
    np.testing.assert_allclose(edges.numpy(), expected, rtol=1e-5)


def _sample(logits: torch.Tensor, n: int, warpers=(), position: int = 0, step: int = 0) -> torch.Tensor:
    keys = row_keys(0, step, 0, torch.arange(n))
    sampler = GumbelSampler(keys, prompt_width=3, max_new_tokens=4, warpers=warpers)
    input_ids = torch.zeros(n, 3 + position, dtype=torch.long)
    return sampler(input_ids, logits.expand(n, -1).clone()).argmax(-1)


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampler_draws_from_softmax_of_temperature_scaled_logits():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    n = 20_000
    for position in (0, 1):
        samples = _sample(logits, n, [TemperatureLogitsWarper(0.7)], position=position)
        counts = torch.bincount(samples, minlength=5).double()
        # Chi-square with 4 degrees of freedom: 18.5 is its 0.1% quantile.
        assert _chi_square(counts, torch.softmax(logits.double() / 0.7, -1)) < 18.5
    first, second = (_sample(logits, n, [TemperatureLogitsWarper(0.7)], position=p) for p in (0, 1))
    # Positions draw independently: agreement is sum(p^2), not 1.
    probs = torch.softmax(logits / 0.7, -1)
    assert (first == second).double().mean().item() == pytest.approx(float((probs**2).sum()), abs=0.02)


def test_sampler_applies_top_k_before_the_noise():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    samples = _sample(logits, 20_000, [TopKLogitsWarper(top_k=2)])
    counts = torch.bincount(samples, minlength=5).double()
    assert counts[2:].sum() == 0
    assert _chi_square(counts[:2], torch.softmax(logits[:2].double(), -1)) < 10.8  # 1 dof, 0.1%


def test_sampler_rows_do_not_depend_on_the_batch():
    logits = torch.randn(6, 50)
    keys = row_keys(3, 7, 0, torch.arange(6))
    full = GumbelSampler(keys, 4, 8)(torch.zeros(6, 5, dtype=torch.long), logits.clone())
    part = GumbelSampler(keys[[4, 1]], 4, 8)(torch.zeros(2, 5, dtype=torch.long), logits[[4, 1]].clone())
    assert torch.equal(part, full[[4, 1]])
    with pytest.raises(RuntimeError, match="completion position 8"):
        GumbelSampler(keys, 4, 8)(torch.zeros(6, 12, dtype=torch.long), logits.clone())


def test_sampling_warpers_mirror_generate():
    config = GenerationConfig(do_sample=True, temperature=0.5, top_k=0, top_p=0.9, min_p=0.05)
    assert [type(w).__name__ for w in sampling_warpers(config)] == [
        "TemperatureLogitsWarper",
        "TopPLogitsWarper",
        "MinPLogitsWarper",
    ]
    assert sampling_warpers(GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)) == []


# ------------------------------------------------------------------ GKD's tensors


@pytest.mark.parametrize("eos", [None, 3, [3, 5]])
def test_rollout_tensors_equal_gkd_post_processing(eos):
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(6, 20, (3, 4), generator=g)
    prompts[0, :2] = 0
    prompt_mask = (prompts != 0).long()
    completions = torch.randint(6, 20, (3, 5), generator=g)
    completions[0, 1] = 3  # EOS at position 1
    completions[1, 3] = 5  # EOS (second id) at position 3
    completions[0, 2:] = 0
    sequences = torch.cat([prompts, completions], 1)
    stub = SimpleNamespace(generate=lambda **kwargs: SimpleNamespace(sequences=sequences))
    config = GenerationConfig(eos_token_id=eos, pad_token_id=0)
    expected = GKDTrainer.generate_on_policy_outputs(
        stub, {"prompts": prompts, "prompt_attention_mask": prompt_mask}, config
    )
    got = rollout_tensors(prompts, prompt_mask, completions, eos)
    for a, b in zip((got.input_ids, got.attention_mask, got.labels), expected, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ the step generator


@pytest.fixture
def generation_model(tokenizer):
    return make_model(tokenizer, hidden_size=32, num_layers=1, seed=3).eval()


# Ten end-of-sequence ids (a list, as Llama 3's): rows end after different numbers of tokens.
EOS_IDS = [3, 10, 11, 12, 13, 14, 15, 16, 17, 18]


def _micro_batches(tokenizer, widths=((3, 5, 4), (6, 2, 6)), seed=0):
    """Left-padded prompt micro-batches: one tuple of row lengths per micro-batch."""
    g = torch.Generator().manual_seed(seed)
    prompts, masks = [], []
    for lengths in widths:
        width = max(lengths)
        ids = torch.full((len(lengths), width), tokenizer.pad_token_id)
        mask = torch.zeros(len(lengths), width, dtype=torch.long)
        for r, n in enumerate(lengths):
            ids[r, width - n :] = torch.randint(4, len(tokenizer), (n,), generator=g)
            mask[r, width - n :] = 1
        prompts.append(ids)
        masks.append(mask)
    rows, offset = [], 0
    for p in prompts:
        rows.append(torch.arange(offset, offset + p.size(0)))
        offset += p.size(0)
    return prompts, masks, rows


def _gkd_config(tokenizer, max_new_tokens=12, temperature=0.9):
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=EOS_IDS,
    )


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for name in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_step_generator_is_batch_invariant(tokenizer, generation_model):
    prompts, masks, rows = _micro_batches(tokenizer)
    config = _gkd_config(tokenizer)
    together = StepGenerator(config, seed=0).generate(generation_model, prompts, masks, rows, step=3)
    assert len(together) == 2
    # Rows end at different lengths (EOS), and each micro-batch is as wide as its own longest row.
    lengths = [r.attention_mask[:, p.size(1) :].sum(1) for r, p in zip(together, prompts, strict=True)]
    assert [n.tolist() for n in lengths] == [[10, 6, 1], [3, 2, 1]]  # (step 3 was picked for this)
    for rollout, prompt, length in zip(together, prompts, lengths, strict=True):
        assert torch.equal(rollout.input_ids[:, : prompt.size(1)], prompt)  # the micro-batch's own prompt padding
        assert rollout.input_ids.size(1) == prompt.size(1) + int(length.max())
    for batch_size in (3, 2, 1):  # split inside micro-batches, one per call, one row per call
        chunked = StepGenerator(config, seed=0, batch_size=batch_size).generate(
            generation_model, prompts, masks, rows, step=3
        )
        _assert_same(chunked, together)
    # One micro-batch alone (as GKD generates it) gives that micro-batch's rollout, given the step's prompt bucket.
    alone = StepGenerator(config, seed=0).generate(generation_model, prompts[1:], masks[1:], rows[1:], step=3)
    _assert_same(alone, together[1:])
    # Another step, seed or process samples differently.
    for kwargs, step in (({"seed": 0}, 4), ({"seed": 1}, 3), ({"seed": 0, "process_index": 1}, 3)):
        other = StepGenerator(config, **kwargs).generate(generation_model, prompts, masks, rows, step=step)
        assert not all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(other, together, strict=True))


def test_step_generator_uses_no_global_rng(tokenizer, generation_model):
    prompts, masks, rows = _micro_batches(tokenizer)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    StepGenerator(_gkd_config(tokenizer), seed=0).generate(generation_model, prompts, masks, rows, step=0)
    assert torch.equal(torch.get_rng_state(), state)


def test_static_cache_and_compiled_decode_match_and_compile_once(tokenizer, generation_model):
    prompts, masks, rows = _micro_batches(tokenizer)
    config = _gkd_config(tokenizer)
    reference = StepGenerator(config, seed=0).generate(generation_model, prompts, masks, rows, step=2)
    static = StepGenerator(config, seed=0, batch_size=4, pad_to_multiple_of=8, static_cache=True)
    _assert_same(static.generate(generation_model, prompts, masks, rows, step=2), reference)
    assert static.num_calls == 2 and static.num_cache_builds == 1  # 6 rows: a full chunk and a filled one

    # The compiled decode step: dynamo traces the model (the eager backend stands in for inductor + CUDA graphs,
    # which need a GPU); transformers compiles only on accelerators unless told otherwise.
    import torch._dynamo.utils

    model = copy.deepcopy(generation_model)
    compile_config = CompileConfig(backend="eager", fullgraph=False, dynamic=False, mode=None)
    compile_config._compile_all_devices = True  # private transformers flag: compile on CPU (tests only)
    fast = StepGenerator(
        config, seed=0, batch_size=4, pad_to_multiple_of=8, static_cache=True, compile_config=compile_config
    )
    counters = torch._dynamo.utils.counters["stats"]
    _assert_same(fast.generate(model, prompts, masks, rows, step=2), reference)
    graphs = counters["unique_graphs"]
    assert graphs >= 1
    # Prompt widths that vary within the bucket (8), and a short chunk: no recompilation, same cache.
    for widths in (((2, 7), (5,)), ((8, 8, 1, 3, 4),), ((1,),)):
        p, m, r = _micro_batches(tokenizer, widths, seed=sum(map(len, widths)))
        expected = StepGenerator(config, seed=0, pad_to_multiple_of=8).generate(generation_model, p, m, r, step=3)
        _assert_same(fast.generate(model, p, m, r, step=3), expected)
    assert counters["unique_graphs"] == graphs
    assert fast.num_cache_builds == 1


def test_input_require_grads_hooks_are_off_while_sampling(tokenizer, generation_model):
    """The input embeddings' `requires_grad_` hooks (gradient checkpointing's, transformers' and PEFT's names) are not
    called by the generator's forwards, every other hook is, and all are back in their order afterwards."""
    model = copy.deepcopy(generation_model)
    embeddings, calls = model.get_input_embeddings(), []

    def make_inputs_require_grads(module, args, output):  # transformers' name
        calls.append("transformers")

    def make_inputs_require_grad(module, args, output):  # PEFT's and TRL's name
        calls.append("peft")

    def other(module, args, output):
        calls.append("other")

    for hook in (make_inputs_require_grads, other, make_inputs_require_grad):
        embeddings.register_forward_hook(hook)
    before = list(_compat.forward_hooks(embeddings).items())
    prompts, masks, rows = _micro_batches(tokenizer)
    StepGenerator(_gkd_config(tokenizer), seed=0).generate(model, prompts, masks, rows, step=1)
    assert calls and set(calls) == {"other"}
    assert list(_compat.forward_hooks(embeddings).items()) == before
    calls.clear()
    model(prompts[0])
    assert calls == ["transformers", "other", "peft"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_decode_step_has_no_graph_break(tokenizer, generation_model, checkpointing):
    """The decode step the fast path compiles (a Qwen2 forward on the static cache, in training mode as the trainers
    sample) is one graph: with `fullgraph=True` dynamo raises at any graph break; the samples stay the eager ones.
    (Checked with transformers 5.25 and 5.17; the GPU runs inductor + CUDA graphs on the same dynamo graph.)

    `checkpointing`: the student as the trainers sample with it: gradient checkpointing is switched off for
    generation (TRL's `unwrap_model_for_generation`) but the input embeddings' `requires_grad_` hook it needs
    (`enable_input_require_grads`) stays registered. torch 2.11's dynamo cannot trace that hook: on an H100 it split
    every decode step into 4 graph breaks until the generator took it off while sampling (this test fails there
    without that; newer torch traces it). It is back, in its place, afterwards."""
    import torch._dynamo.utils

    torch._dynamo.reset()  # no decode step compiled by an earlier test (its guards may not see the hook)
    prompts, masks, rows = _micro_batches(tokenizer)
    config = _gkd_config(tokenizer)
    reference = StepGenerator(config, seed=0).generate(generation_model, prompts, masks, rows, step=4)
    model = copy.deepcopy(generation_model).train()
    embeddings = model.get_input_embeddings()
    if checkpointing:
        model.enable_input_require_grads()
        embeddings.register_forward_hook(lambda module, args, output: None)  # another hook, after it
    hooks_before = list(_compat.forward_hooks(embeddings).items())
    assert any(_compat.is_input_require_grads_hook(h) for _, h in hooks_before) == checkpointing
    compile_config = CompileConfig(backend="eager", fullgraph=True, dynamic=False, mode=None)
    compile_config._compile_all_devices = True  # private transformers flag: compile on CPU (tests only)
    fast = StepGenerator(
        config, seed=0, batch_size=4, pad_to_multiple_of=8, static_cache=True, compile_config=compile_config
    )
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    _assert_same(fast.generate(model, prompts, masks, rows, step=4), reference)
    assert fast.num_compile_failures == 0 and fast.compile_config is compile_config  # no fallback to eager
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == breaks
    assert list(_compat.forward_hooks(embeddings).items()) == hooks_before


def test_compiled_static_decode_with_a_lora_student(tokenizer, generation_model):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        copy.deepcopy(generation_model),
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    with torch.no_grad():  # non-zero adapters, so that they change the samples
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    prompts, masks, rows = _micro_batches(tokenizer)
    config = _gkd_config(tokenizer)
    reference = StepGenerator(config, seed=0).generate(model, prompts, masks, rows, step=3)
    base = StepGenerator(config, seed=0).generate(generation_model, prompts, masks, rows, step=3)
    assert not all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(reference, base, strict=True))
    compile_config = CompileConfig(backend="eager", fullgraph=False, dynamic=False, mode=None)
    compile_config._compile_all_devices = True  # private transformers flag: compile on CPU (tests only)
    fast = StepGenerator(config, seed=0, batch_size=4, static_cache=True, compile_config=compile_config)
    _assert_same(fast.generate(model, prompts, masks, rows, step=3), reference)


def test_step_generator_refuses_bad_settings(tokenizer):
    config = _gkd_config(tokenizer)
    with pytest.raises(ValueError, match="batch_size"):
        StepGenerator(config, seed=0, batch_size=0)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        StepGenerator(config, seed=0, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="fixed batch_size"):
        StepGenerator(config, seed=0, static_cache=True)
    with pytest.raises(ValueError, match="static_cache"):
        StepGenerator(config, seed=0, batch_size=2, compile_config=CompileConfig())
    with pytest.raises(ValueError, match="num_beams"):
        StepGenerator(GenerationConfig(max_new_tokens=4, num_beams=2, pad_token_id=0), seed=0)


def test_fast_generation_problem(tokenizer):
    model = make_model(tokenizer, hidden_size=32, num_layers=1)
    assert "CUDA" in fast_generation_problem(model, torch.device("cpu"))
    assert fast_generation_problem(model, torch.device("cuda")) is None  # reads the module types only
    bnb = pytest.importorskip("bitsandbytes")
    quantized = torch.nn.Sequential(bnb.nn.Linear4bit(8, 8))
    assert "quantized (Linear4bit)" in fast_generation_problem(quantized, torch.device("cuda"))
    model.hf_device_map = {"model": 0, "lm_head": "cpu"}
    assert "offloaded" in fast_generation_problem(model, torch.device("cuda"))


# ------------------------------------------------------------------ the trainer


def _trainer(tmp_path, student, teacher, tokenizer, dataset, **overrides):
    args = tiny_args(tmp_path, **overrides)
    return TIPTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )


class _Rollouts:
    """Records every micro-batch `_generate_on_policy` returns, and which model generated rows in each call."""

    def __init__(self, trainer):
        self.batches, self.models = [], []
        generate_step, generate = trainer._generate_on_policy, trainer.tip_generator.generate

        def step(batches):
            out = generate_step(batches)
            self.batches.extend({k: out_b[k].clone() for k in ("input_ids", "labels")} for out_b in out)
            return out

        def call(model, **kwargs):
            self.models.append((model is trainer.accelerator.unwrap_model(trainer.model), len(kwargs["prompts"])))
            return generate(model, **kwargs)

        trainer._generate_on_policy = step
        trainer.tip_generator.generate = call


GA_OPTIONS = dict(
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    lmbda=0.5,
    seq_kd=True,
    max_steps=3,
    token_selection="entropy_sample",
    keep_ratio=0.5,
    temperature=0.9,
)


def test_trainer_training_does_not_depend_on_the_generation_batch_size(tmp_path, student, teacher, tokenizer, dataset):
    runs = []
    for generation_batch in (None, 2, 1):
        trainer = _trainer(
            tmp_path / str(generation_batch),
            copy.deepcopy(student),
            teacher,
            tokenizer,
            dataset,
            per_device_generation_batch_size=generation_batch,
            **GA_OPTIONS,
        )
        rollouts = _Rollouts(trainer)
        trainer.train()
        logs = [log for log in trainer.state.log_history if "loss" in log]
        runs.append((rollouts, logs))
    first, _ = runs[0]
    # The seed draws student and teacher rollouts (and both in one step), so both paths are covered.
    assert {is_student for is_student, _ in first.models} == {True, False}
    assert len(first.batches) == 6
    for rollouts, logs in runs[1:]:
        assert len(rollouts.batches) == len(first.batches)
        for a, b in zip(first.batches, rollouts.batches, strict=True):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        for log, ref in zip(logs, runs[0][1], strict=True):
            for key in ["loss", "grad_norm", *metric_names()]:
                assert log[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-9), key


def test_trainer_draws_like_gkd_one_per_micro_batch(tmp_path, student, teacher, tokenizer, dataset):
    loader = iter(
        _trainer(tmp_path / "data", student, teacher, tokenizer, dataset, **GA_OPTIONS).get_train_dataloader()
    )
    batches = [next(loader) for _ in range(4)]
    random.seed(11)
    draws = [random.random() <= GA_OPTIONS["lmbda"] for _ in batches]
    after_draws = random.random()
    assert set(draws) == {True, False}
    for seq_kd in (True, False):
        trainer = _trainer(
            tmp_path / str(seq_kd), student, teacher, tokenizer, dataset, **{**GA_OPTIONS, "seq_kd": seq_kd}
        )
        rollouts = _Rollouts(trainer)
        originals = [trainer._prepare_inputs(copy.deepcopy(b)) for b in batches]
        random.seed(11)
        out = trainer._generate_on_policy(copy.deepcopy(batches))
        assert random.random() == after_draws  # exactly one draw per micro-batch, as GKD's training_step
        students = sum(draws) * batches[0]["prompts"].size(0)
        expected = [(True, sum(draws))] + ([(False, len(draws) - sum(draws))] if seq_kd else [])
        assert rollouts.models == expected and students > 0
        for drawn, original, batch in zip(draws, originals, out, strict=True):
            regenerated = not torch.equal(batch["labels"], original["labels"])
            # Student rollouts when drawn, else teacher rollouts with seq_kd, else the dataset's completion.
            assert regenerated == (drawn or seq_kd)


def test_generation_mode_checkpointing_off_and_no_hook_leak(tmp_path, student, teacher, tokenizer, dataset):
    trainer = _trainer(tmp_path, student, teacher, tokenizer, dataset, gradient_checkpointing=True, max_steps=4)
    seen = []
    generate = student.generate
    hooks = forward_hooks(student.get_input_embeddings())

    def recording(*args, **kwargs):
        seen.append((student.is_gradient_checkpointing, len(hooks), student.training))
        return generate(*args, **kwargs)

    student.generate = recording
    student.eval()  # as from_pretrained returns it: the first generation still samples in training mode
    trainer.train()
    # Re-enabling checkpointing after each generation registers another input-embedding hook that disabling does not
    # remove (transformers); TIPTrainer drops the duplicates, so the count stays put (a compiled decode step guards
    # on it) and the hook that makes the inputs require grad remains. While sampling it is off (dynamo cannot trace
    # its `requires_grad_`): 0 hooks inside `generate`, the one hook again after.
    assert seen == [(False, 0, True)] * 4
    assert student.is_gradient_checkpointing and len(hooks) == 1


def test_resume_with_batched_generation_is_exact(tmp_path, student, teacher, tokenizer, dataset):
    fresh = copy.deepcopy(student)
    options = {**GA_OPTIONS, "logging_steps": 1}
    trainer = _trainer(tmp_path, student, teacher, tokenizer, dataset, save_strategy="steps", save_steps=1, **options)
    trainer.train()
    resumed = _trainer(tmp_path, fresh, teacher, tokenizer, dataset, save_strategy="no", **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    first = {log["step"]: log for log in trainer.state.log_history if "loss" in log}
    second = {log["step"]: log for log in resumed.state.log_history if "loss" in log}
    for step in (2, 3):
        for key in [*metric_names(), "loss", "grad_norm"]:
            assert second[step][key] == pytest.approx(first[step][key], rel=1e-5, abs=1e-9), (step, key)


def test_generation_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="per_device_generation_batch_size"):
        tiny_args(tmp_path, per_device_generation_batch_size=0)
    with pytest.raises(ValueError, match="generation_pad_to_multiple_of"):
        tiny_args(tmp_path, generation_pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="fast_generation=True needs a CUDA device"):
        tiny_args(tmp_path, fast_generation=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_fast_generation_is_refused_without_cuda(tmp_path, student, teacher, tokenizer, dataset):
    with pytest.raises(ValueError, match="fast_generation=True cannot be used here: the student: it needs a CUDA"):
        _trainer(tmp_path, student, teacher, tokenizer, dataset, use_cpu=False, fast_generation=True)
