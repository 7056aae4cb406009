"""Contract tests: the private or moved TRL / transformers APIs trl-tip uses (all through `trl_tip._compat`) still
behave as trl-tip relies on. An upgrade that changes one fails here, with the name of the API, rather than deep inside
a training run."""

import inspect
import os

import torch
import torch.nn as nn
from transformers import Trainer

from trl_tip import _compat
from trl_tip.signals import generalized_jsd


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_gkd_lives_in_trl_experimental_and_keeps_its_hooks():
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    assert _compat.GKDTrainer is GKDTrainer and _compat.GKDConfig is GKDConfig
    # TIPTrainer generates with GKD's helper and reads these config fields.
    assert params(GKDTrainer.generate_on_policy_outputs) == ["model", "inputs", "generation_config"]
    for field in ("lmbda", "beta", "temperature", "seq_kd", "max_new_tokens", "teacher_model_name_or_path"):
        assert field in GKDConfig.__dataclass_fields__, field


def test_distillation_trainer_private_loss_hooks():
    trainer = _compat.DistillationTrainer
    assert params(trainer._compute_loss) == ["self", "unwrapped_student", "inputs", "num_items_in_batch"]
    assert params(trainer._get_last_hidden_state)[:5] == [
        "self",
        "unwrapped_model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
    ]
    # `compute_loss` routes `_compute_loss` through `_forward_redirection` and divides the step's token count by the
    # process count before passing it on (TIPDistillationTrainer multiplies it back).
    source = inspect.getsource(trainer.compute_loss)
    assert "_forward_redirection" in source and "self._compute_loss" in source
    assert "num_processes" in source
    # It keeps the buffered generation per optimizer step in `_prepare_inputs` and counts the loss tokens there.
    assert "num_items_in_batch" in inspect.getsource(trainer._generate_and_score_completions)
    assert issubclass(_compat.DistillationConfig, object) and "beta" in _compat.DistillationConfig.__dataclass_fields__


def test_forward_redirection_routes_a_method_through_the_wrapper():
    class Inner(nn.Module):
        def forward(self, x):
            return x

        def special(self, x, y):
            return x * y

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.calls = 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    inner = Inner()
    wrapper = Wrapper(inner)
    out = _compat.ForwardRedirection()(wrapper, inner, inner.special, torch.tensor(2.0), torch.tensor(3.0))
    assert out == 6.0 and wrapper.calls == 1
    assert inner.forward(torch.tensor(1.0)) == 1.0  # the original forward is restored


def test_unwrap_model_for_generation_is_a_context_manager_taking_generation_kwargs():
    sig = inspect.signature(_compat.unwrap_model_for_generation)
    assert list(sig.parameters)[:2] == ["model", "accelerator"]
    assert "generation_kwargs" in sig.parameters and "gradient_checkpointing_kwargs" in sig.parameters


def test_maybe_gather_lm_head_ctx_is_a_no_op_without_zero3():
    weight = nn.Parameter(torch.ones(3, 2))
    with _compat.maybe_gather_lm_head_ctx(weight, None):
        assert weight.shape == (3, 2)


def test_chunked_divergence_function_returns_per_token_divergence_and_entropy():
    torch.manual_seed(0)
    hs, ht = torch.randn(5, 4), torch.randn(5, 6)
    ws, wt = torch.randn(11, 4, requires_grad=True), torch.randn(11, 6)
    for beta in (0.0, 0.5, 1.0):
        div, ent = _compat.ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, beta, 1.0, 1.0, None, 1.0, None)
        ref = generalized_jsd(hs @ ws.t(), ht @ wt.t(), beta)
        torch.testing.assert_close(div, ref, rtol=1e-4, atol=1e-6)
        logp = torch.log_softmax(hs @ ws.t(), -1)
        torch.testing.assert_close(ent, -(logp.exp() * logp).sum(-1), rtol=1e-4, atol=1e-6)


def test_prepare_deepspeed_is_callable_with_model_and_accelerator():
    assert params(_compat.prepare_deepspeed)[:2] == ["model", "accelerator"]


def test_checkpoint_names_and_sorting(tmp_path):
    assert _compat.PREFIX_CHECKPOINT_DIR == "checkpoint"
    assert _compat.TRAINER_STATE_NAME == "trainer_state.json"
    for step in (10, 2, 30):
        os.makedirs(tmp_path / f"checkpoint-{step}")
    assert [os.path.basename(p) for p in _compat.sort_checkpoints(str(tmp_path))] == [
        "checkpoint-2",
        "checkpoint-10",
        "checkpoint-30",
    ]


def test_trainer_private_methods_trl_tip_overrides_keep_their_signatures():
    """`TIPTrainerMixin` / `TIPTrainer` override or call these `transformers.Trainer` internals."""
    assert params(Trainer._save_checkpoint) == ["self", "model", "trial"]
    assert params(Trainer._load_from_checkpoint)[:2] == ["self", "resume_from_checkpoint"]
    assert params(Trainer._load_rng_state) == ["self", "checkpoint"]
    assert params(Trainer.get_batch_samples) == ["self", "epoch_iterator", "num_batches", "device"]
    assert params(Trainer._get_output_dir) == ["self", "trial"]
    assert "num_items_in_batch" in params(Trainer.compute_loss)
    assert "num_items_in_batch" in params(Trainer.training_step)
    # `get_batch_samples` is where Trainer counts the step's tokens; it returns (batches, count).
    assert "return batch_samples, num_items_in_batch" in inspect.getsource(Trainer.get_batch_samples)
    # Trainer skips its own division by the accumulation steps when the trainer declares it scales itself.
    assert "loss_is_scaled_for_ga" in inspect.getsource(Trainer.training_step)


def test_trl_vocab_tile_matches_the_kernel():
    """`kept_token_jsd(backend="auto")` picks TRL's kernel only for vocabularies of at least one of its tiles."""
    from trl.kernels import chunked_divergence

    from trl_tip.loss import TRL_VOCAB_TILE

    assert chunked_divergence.VOCAB_CHUNK_SIZE == TRL_VOCAB_TILE


def test_gkd_parent_training_step_skips_gkd_generation():
    """TIPTrainer generates the step's rollouts in `get_batch_samples`; its `training_step` is the one of GKDTrainer's
    parent, which does not generate."""
    from trl.trainer.sft_trainer import SFTTrainer

    assert "generate_on_policy_outputs" in inspect.getsource(_compat.GKDTrainer.training_step)
    assert _compat.GKDTrainer.__mro__[1] is SFTTrainer
    assert "generate_on_policy_outputs" not in inspect.getsource(SFTTrainer.training_step)
    assert "super().training_step(*args, **kwargs)" in inspect.getsource(SFTTrainer.training_step)

    calls = []

    class Probe(_compat.GKDTrainer):
        pass

    probe = object.__new__(Probe)
    original = SFTTrainer.training_step
    try:
        SFTTrainer.training_step = lambda self, model, inputs, n=None: calls.append((self, model, inputs, n)) or 1.0
        assert _compat.gkd_parent_training_step(probe, "m", {"x": 1}, 3) == 1.0
    finally:
        SFTTrainer.training_step = original
    assert calls == [(probe, "m", {"x": 1}, 3)]


def test_load_rng_state_and_prepare_inputs_are_trainer_internals(tmp_path):
    import random

    import numpy as np

    # GKDTrainer and DistillationTrainer inherit them unchanged (DistillationTrainer's `_prepare_inputs` generates;
    # trl-tip calls the base one only for GKD batches).
    assert _compat.GKDTrainer._load_rng_state is Trainer._load_rng_state
    assert _compat.GKDTrainer._prepare_inputs is Trainer._prepare_inputs
    assert params(Trainer._prepare_inputs) == ["self", "inputs"]
    trainer = object.__new__(Trainer)
    trainer.args = type("Args", (), {"world_size": 1, "process_index": 0, "parallel_mode": None})()
    saved = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    torch.save(saved, tmp_path / "rng_state.pth")
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    _compat.load_rng_state(trainer, str(tmp_path))
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])


def test_distillation_generation_turn_hook():
    """TIPDistillationTrainer's fast path overrides `_generate_single_turn` and reads these attributes."""
    trainer = _compat.DistillationTrainer
    assert params(trainer._generate_single_turn) == [
        "self",
        "prompt_ids",
        "images",
        "multimodal_fields",
        "has_tool_images",
    ]
    generate = inspect.getsource(trainer._generate)
    assert "self._generate_single_turn(prompt_ids, images, multimodal_fields)" in generate
    turn = inspect.getsource(trainer._generate_single_turn)
    # TRL's transformers path: each row's completion up to and including its first EOS, as a list of ids.
    assert "sequence_indices <= eos_idx.unsqueeze(1)" in turn and ".tolist()" in turn
    init = inspect.getsource(trainer.__init__)
    for attribute in (
        "self.use_vllm",
        "self.tools",
        "self._is_vlm",
        "self._tokenizer",
        "self.eos_token_ids",
        "self.generation_config",
        "self.generation_kwargs",
    ):
        assert attribute in init, attribute
    # Generation happens once per optimizer step: `_prepare_inputs` buffers every `gradient_accumulation_steps`.
    assert "_buffered_inputs" in inspect.getsource(trainer._prepare_inputs)


def test_transformers_flags_models_it_can_compile():
    """`fast_generation='auto'` reads `_can_compile_fullgraph` (transformers: static cache + compiled forward)."""
    from transformers import PreTrainedModel, Qwen2ForCausalLM

    assert PreTrainedModel._can_compile_fullgraph is False
    assert Qwen2ForCausalLM._can_compile_fullgraph is True
