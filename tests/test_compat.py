"""Contract tests: the private or moved TRL / transformers / torch APIs trl-tip uses still behave as trl-tip relies on.
Those it imports or calls go through `trl_tip._compat`; the `transformers.Trainer` and TRL trainer methods it
overrides are checked on the classes themselves. An upgrade that changes one fails here, with the name of the API,
rather than deep inside a training run."""

import inspect
import os

import pytest
import torch
import torch.nn as nn
from transformers import Trainer

from trl_tip import _compat
from trl_tip.signals import generalized_jsd
from trl_tip.toy import make_model


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
    # It counts the optimizer step's loss tokens when it generates (`_prepare_inputs` buffers one generation per
    # optimizer step) and passes the count on in the inputs, where TIPDistillationTrainer's loss reads it.
    assert "num_items_in_batch" in inspect.getsource(trainer._generate_and_score_completions)
    assert issubclass(_compat.DistillationConfig, object) and "beta" in _compat.DistillationConfig.__dataclass_fields__


def test_last_hidden_state_is_the_backbone_output_before_the_last_position(tmp_path):
    """`_compat.last_hidden_state` (TRL's `_get_last_hidden_state`): the backbone's hidden states, no `lm_head`, at the
    `logits_to_keep` positions before the last one (position `j` predicts token `L - logits_to_keep + j`)."""
    from conftest import dist_args, left_tokenizer, prompt_dataset

    tokenizer = left_tokenizer()
    student = make_model(tokenizer, 32, 1, seed=1)
    trainer = _compat.DistillationTrainer(
        model=student,
        teacher_model=make_model(tokenizer, 48, 1, seed=2),
        args=dist_args(tmp_path, _compat.DistillationConfig),
        train_dataset=prompt_dataset(4),
        processing_class=tokenizer,
    )
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, len(tokenizer), (2, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding
    with torch.no_grad():
        hidden = _compat.last_hidden_state(trainer, student, input_ids, attention_mask, 4)
        full = student.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    assert hidden.shape == (2, 4, 32)
    torch.testing.assert_close(hidden, full[:, 4:8])


def test_forward_hooks_are_keyed_by_handle_and_deleting_one_removes_it():
    """`_compat.forward_hooks` (torch's `Module._forward_hooks`): `unwrap_for_generation` lists an embedding's hooks
    before generating and deletes, by key, the duplicates that re-enabling gradient checkpointing added."""
    layer, calls = nn.Linear(2, 2), []

    def first(module, args, output):
        calls.append("first")

    def second(module, args, output):
        calls.append("second")

    handles = [layer.register_forward_hook(first), layer.register_forward_hook(second)]
    hooks = _compat.forward_hooks(layer)
    assert list(hooks) == [h.id for h in handles] and hooks[handles[0].id] is first
    layer(torch.ones(2))
    assert calls == ["first", "second"]
    del hooks[handles[0].id]
    layer(torch.ones(2))
    assert calls == ["first", "second", "second"] and list(_compat.forward_hooks(layer)) == [handles[1].id]


def test_input_require_grads_hook_is_recognised_by_name(tokenizer):
    """`_compat.is_input_require_grads_hook`: transformers' `enable_input_require_grads` registers, on the input
    embeddings, a local function named `make_inputs_require_grads` (the generator takes it off while sampling); PEFT
    names its own `make_inputs_require_grad`. Other hooks are not matched."""
    model = make_model(tokenizer, hidden_size=16, num_layers=1, seed=0)
    hooks = _compat.forward_hooks(model.get_input_embeddings())
    assert not any(_compat.is_input_require_grads_hook(h) for h in hooks.values())
    model.enable_input_require_grads()
    matched = [h for h in hooks.values() if _compat.is_input_require_grads_hook(h)]
    assert len(matched) == 1
    x = torch.zeros(2)
    assert matched[0](model.get_input_embeddings(), (), x) is None and x.requires_grad  # in place: requires grad
    assert not _compat.is_input_require_grads_hook(lambda module, args, output: None)


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


def test_checkpoint_dir_is_where_trainer_saves_and_rotation_ends_the_save(tmp_path):
    """`checkpoint_dir` (`Trainer._get_output_dir` + `checkpoint-{step}`) is the folder `Trainer._save_checkpoint`
    writes; that method deletes old checkpoints at its end, so trl-tip writes its state into the folder before."""
    from transformers import TrainingArguments

    from trl_tip.toy import make_model, make_tokenizer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_only_model=True)
    trainer = Trainer(model=make_model(make_tokenizer(), 16, 1), args=args)
    trainer.state.global_step = 7
    expected = _compat.checkpoint_dir(trainer, None)
    assert expected == os.path.join(str(tmp_path), "checkpoint-7")
    trainer._save_checkpoint(trainer.model, trial=None)
    assert os.path.isfile(os.path.join(expected, _compat.TRAINER_STATE_NAME))
    source = inspect.getsource(Trainer._save_checkpoint)
    assert source.index("rotate_checkpoints(") > source.index("save_to_json")


def test_distillation_generation_returns_the_step_rollouts_masks():
    """`TIPDistillationTrainer` counts the optimizer step's rollouts after `_generate_and_score_completions`, which
    TRL calls once per optimizer step in training (in `_prepare_inputs`) and which returns their masks."""
    trainer = _compat.DistillationTrainer
    assert params(trainer._generate_and_score_completions) == ["self", "inputs"]
    source = inspect.getsource(trainer._generate_and_score_completions)
    for key in ('"completion_mask"', '"tool_mask"', '"num_items_in_batch"'):
        assert key in source, key
    prepare = inspect.getsource(trainer._prepare_inputs)
    assert "generate_every = self.args.gradient_accumulation_steps" in prepare
    assert "self._generate_and_score_completions(generation_batch)" in prepare


def test_tracker_url_helpers_return_none_without_a_tracker_run():
    """trl-tip's model card shows TRL's tracker badges through TRL's helpers: no run, no link."""
    from trl_tip._compat import get_comet_experiment_url, get_trackio_space_url

    assert get_trackio_space_url() is None
    assert get_comet_experiment_url() is None


def test_argparse_actions_are_the_parsers_options():
    """`trl-tip train` reads `parser._actions` (private in argparse) for each option's dest, strings, type, nargs."""
    from trl_tip.train import make_parser

    actions = _compat.argparse_actions(make_parser("gkd"))
    by_dest = {a.dest: a for a in actions if a.option_strings}
    assert "--keep_ratio" in by_dest["keep_ratio"].option_strings and by_dest["keep_ratio"].type("none") is None
    assert by_dest["quadrants"].nargs == "+" and by_dest["seq_kd"].const is True


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


def test_static_kv_cache_casts_new_states_to_the_dtypes_it_stores():
    from transformers import Qwen2Config, StaticCache

    from trl_tip._compat import static_kv_cache

    config = Qwen2Config(
        vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    keys = torch.randn(1, 1, 3, 8)  # float32: RoPE promotes the keys under autocast with float32 weights
    values = torch.randn(1, 1, 3, 8, dtype=torch.bfloat16)  # v_proj's output under bf16 autocast

    # transformers 5.17 allocates a layer's values in the keys' dtype; early_initialization does so in every release.
    plain = StaticCache(config=config, max_cache_len=6)
    plain.early_initialization(batch_size=1, num_heads=1, head_dim=8, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="same dtype"):
        plain.layers[0].update(keys, values)

    cache = static_kv_cache(config, max_cache_len=6)
    assert len(cache.layers) == 2 and all(isinstance(layer, type(plain.layers[0])) for layer in cache.layers)
    cache.early_initialization(batch_size=1, num_heads=1, head_dim=8, dtype=torch.float32, device=torch.device("cpu"))
    stored_keys, stored_values = cache.layers[0].update(keys, values)
    assert stored_values.dtype == torch.float32
    torch.testing.assert_close(stored_keys[:, :, :3], keys)
    torch.testing.assert_close(stored_values[:, :, :3], values.float())
    assert not stored_values[:, :, 3:].any()

    # Lazily initialised (the fast path's case): the first states set the dtypes, later ones are cast to them.
    lazy = static_kv_cache(config, max_cache_len=6)
    lazy.layers[1].update(keys, values)
    stored_keys, stored_values = lazy.layers[1].update(keys[:, :, :1].bfloat16(), values[:, :, :1].float())
    assert stored_keys.dtype == torch.float32 and stored_values.dtype in (torch.bfloat16, torch.float32)
    torch.testing.assert_close(stored_keys[:, :, 3], keys[:, :, 0].bfloat16().float())
