"""Every TRL / transformers API trl-tip uses that is private, experimental or moved between releases, in one place.

Each name here has a contract test (`tests/test_compat.py`) that checks the behaviour trl-tip relies on, so that an
upgrade that changes one breaks there, loudly, and not deep inside a training run. Tested with TRL 1.16 and
transformers 5.17–5.23 (see `pyproject.toml` for the pins).
"""

from __future__ import annotations

import warnings

from transformers import Trainer

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
# num_items_in_batch) -> (loss, entropy_sum, num_valid)`, `_get_last_hidden_state` and
# `_generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)` (each row's completion ids up to its
# first EOS; the fast path overrides it) are private: contract-tested.
from trl.trainer.distillation_config import DistillationConfig
from trl.trainer.distillation_trainer import DistillationTrainer

# Gathers ZeRO-3 partitioned lm_head weights for a direct read (TRL's helper for fused losses).
from trl.trainer.utils import maybe_gather_lm_head_ctx


# GKD lives in `trl.experimental.gkd` since TRL 1.0 (top-level before); trl-tip requires TRL >= 1.16. Importing
# `trl.experimental` warns once that its APIs are unstable; that concerns trl-tip's pinned use, not the user's code.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=TRLExperimentalWarning)
    from trl.experimental.gkd import GKDConfig, GKDTrainer


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
    "ChunkedDivergenceFunction",
    "DistillationConfig",
    "DistillationTrainer",
    "ForwardRedirection",
    "GKDConfig",
    "GKDTrainer",
    "gkd_parent_training_step",
    "load_rng_state",
    "prepare_inputs",
    "maybe_gather_lm_head_ctx",
    "prepare_deepspeed",
    "sort_checkpoints",
    "unwrap_model_for_generation",
]
