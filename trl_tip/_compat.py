"""Every TRL / transformers / torch API trl-tip uses that is private, experimental or moved between releases, in one
place.

Each name here has a contract test (`tests/test_compat.py`) that checks the behaviour trl-tip relies on, so that an
upgrade that changes one breaks there, loudly, and not deep inside a training run. Tested with TRL 1.16 and
transformers 5.17–5.25 (see `pyproject.toml` for the ranges and `constraints/tested.txt` for the exact tested set).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from transformers import StaticCache, Trainer

# Name of the folders Trainer writes checkpoints into, and the trainer-state file marking a complete one.
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints
from trl.import_utils import TRLExperimentalWarning

# TRL's chunked divergence kernel (Triton on GPU, torch elsewhere): per-token generalized JSD and entropy.
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

# Prepares a frozen teacher for DeepSpeed (ZeRO-3 shards it like the student).
from trl.models import prepare_deepspeed

# Reroutes a method call through a DDP/FSDP/DeepSpeed wrapper's forward (private in TRL).
from trl.models.utils import _ForwardRedirection as ForwardRedirection
from trl.models.utils import unwrap_model_for_generation

# The mainline on-policy distillation trainer (TRL >= 1.16). `_compute_loss(unwrapped_student, inputs,
# num_items_in_batch) -> (loss, entropy_sum, num_valid)`, `_get_last_hidden_state` (through `last_hidden_state` below),
# `_generate_and_score_completions` (once per optimizer step in training; returns the step's rollouts with
# `completion_mask`, `tool_mask`) and `_generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)`
# (each row's completion ids up to its first EOS; the fast path overrides it) are private: contract-tested.
from trl.trainer.distillation_config import DistillationConfig
from trl.trainer.distillation_trainer import DistillationTrainer

# Gathers ZeRO-3 partitioned lm_head weights for a direct read (TRL's helper for fused losses).
# The tracker links TRL's model card shows (`None` when the tracker is not in use): used by trl-tip's own card.
from trl.trainer.utils import get_comet_experiment_url, get_trackio_space_url, maybe_gather_lm_head_ctx


# GKD lives in `trl.experimental.gkd` since TRL 1.0 (top-level before); trl-tip requires TRL >= 1.16. Importing
# `trl.experimental` warns once that its APIs are unstable; that concerns trl-tip's pinned use, not the user's code.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=TRLExperimentalWarning)
    from trl.experimental.gkd import GKDConfig, GKDTrainer


def checkpoint_dir(trainer, trial=None) -> str:
    """The folder `Trainer._save_checkpoint` writes the current step's checkpoint into.

    `Trainer._get_output_dir(trial)` (private: the run folder, per trial under a hyperparameter search) joined with
    `checkpoint-{global_step}`. trl-tip overrides the private `Trainer._save_checkpoint(model, trial)`, which ends by
    deleting old checkpoints (`save_total_limit`): it writes its own state into this folder before calling it.
    """
    return os.path.join(trainer._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")


def last_hidden_state(
    trainer: DistillationTrainer,
    unwrapped_model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    **model_kwargs: Any,
) -> torch.Tensor:
    """TRL's private `DistillationTrainer._get_last_hidden_state`: the backbone's last hidden states (no `lm_head`) at
    the `logits_to_keep` positions before the last, `(B, logits_to_keep, d)`; position `j` predicts token
    `L - logits_to_keep + j`. `model_kwargs` are the multimodal fields TRL forwards (`pixel_values`, ...)."""
    return trainer._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, logits_to_keep, **model_kwargs)


def forward_hooks(module: nn.Module) -> dict[int, Callable]:
    """torch's private `Module._forward_hooks`: the module's forward hooks (without kwargs), keyed by the id of their
    `RemovableHandle`, in call order. Deleting a key removes that hook, as `handle.remove()` does."""
    return module._forward_hooks


# The names of the forward hooks that make the input embeddings' output require grad, for gradient checkpointing with
# frozen embeddings: transformers' `PreTrainedModel.enable_input_require_grads` and PEFT's / TRL's
# `prepare_model_for_kbit_training`-style hook (local functions, so only their names identify them).
INPUT_REQUIRE_GRADS_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


def is_input_require_grads_hook(hook: Callable) -> bool:
    """Whether `hook` is one of the input-embedding hooks of `INPUT_REQUIRE_GRADS_HOOKS` (`output.requires_grad_()`)."""
    return getattr(hook, "__name__", None) in INPUT_REQUIRE_GRADS_HOOKS


def gkd_parent_training_step(trainer, model, inputs, num_items_in_batch):
    """The `training_step` of `GKDTrainer`'s parent (`SFTTrainer`'s): a step on `inputs` as given, without GKD's
    on-policy generation (TIPTrainer has generated the whole optimizer step's completions before)."""
    return super(GKDTrainer, trainer).training_step(model, inputs, num_items_in_batch)


def load_rng_state(trainer, checkpoint) -> None:
    """`Trainer._load_rng_state` (private): restores the Python, NumPy and torch RNG states saved with `checkpoint`."""
    Trainer._load_rng_state(trainer, checkpoint)


def prepare_inputs(trainer, inputs):
    """`Trainer._prepare_inputs` (private): moves a batch's tensors to the trainer's device (no generation; TRL's
    `DistillationTrainer` overrides the method to generate, this is the base one)."""
    return Trainer._prepare_inputs(trainer, inputs)


__all__ = [
    "PREFIX_CHECKPOINT_DIR",
    "TRAINER_STATE_NAME",
    "argparse_actions",
    "ChunkedDivergenceFunction",
    "DistillationConfig",
    "DistillationTrainer",
    "ForwardRedirection",
    "GKDConfig",
    "GKDTrainer",
    "checkpoint_dir",
    "get_comet_experiment_url",
    "get_trackio_space_url",
    "forward_hooks",
    "last_hidden_state",
    "gkd_parent_training_step",
    "load_rng_state",
    "prepare_inputs",
    "maybe_gather_lm_head_ctx",
    "prepare_deepspeed",
    "sort_checkpoints",
    "static_kv_cache",
    "unwrap_model_for_generation",
]


_DTYPE_STABLE_LAYERS: dict[type, type] = {}


def _dtype_stable(layer_class: type) -> type:
    """`layer_class` with an `update` that casts new keys and values to the dtypes the layer stores."""
    if layer_class not in _DTYPE_STABLE_LAYERS:

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            key_states, value_states = key_states.to(self.keys.dtype), value_states.to(self.values.dtype)
            return super(cls, self).update(key_states, value_states, *args, **kwargs)

        cls = type(f"DtypeStable{layer_class.__name__}", (layer_class,), {"update": update})
        _DTYPE_STABLE_LAYERS[layer_class] = cls
    return _DTYPE_STABLE_LAYERS[layer_class]


def static_kv_cache(config, max_cache_len: int) -> StaticCache:
    """transformers' `StaticCache(config=config, max_cache_len=max_cache_len)` whose layers cast the keys and values
    they are given to the dtypes they store.

    Under autocast with float32 weights a layer's keys come out float32 (RoPE multiplies them by float32 cos/sin) and
    its values bfloat16. transformers 5.17 allocates a static layer's values in the keys' dtype (5.25 in their own),
    so the first `index_copy_` of the values fails (found on an H100 with float32 weights and `bf16=True`). The layer
    classes are the cache's own (`cache.layers`, public), subclassed; the cast is a no-op when the dtypes agree.
    """
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    for layer in cache.layers:
        layer.__class__ = _dtype_stable(type(layer))
    return cache


def argparse_actions(parser) -> list:
    """The actions of an `argparse.ArgumentParser` (`parser._actions`, private in argparse): every option with its
    `dest`, `option_strings`, `type`, `nargs`, `const` and `help`. `trl-tip train` reads them to tell which options a
    command line gives and to rewrite TRL's help text of the teacher."""
    return parser._actions
