"""The selection state in checkpoints: what [`TIPTrainerMixin`] saves next to TRL's checkpoint and restores on resume.

Each rank writes the engine's state (`tip_state_rank{rank}.pt`: statistics, the selector's state, the micro-batch
counter) and the process that saves the model writes each signal provider's state under its `state_name` (e.g.
ssToken's history model), all before `Trainer` writes anything, so before it deletes old checkpoints.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers.utils import logging

from .._compat import TRAINER_STATE_NAME, checkpoint_dir, sort_checkpoints


__all__ = ["TIP_STATE_NAME", "TIPCheckpointMixin"]

logger = logging.get_logger(__name__)

TIP_STATE_NAME = "tip_state_rank{rank}.pt"


class TIPCheckpointMixin:
    """`_save_checkpoint` and `train(resume_from_checkpoint=...)` of a trl-tip trainer (before TRL's in the MRO)."""

    def _tip_state(self) -> dict[str, Any]:
        return {**self.tip_engine.state_dict(), "last_logged_step": self._tip_last_logged_step}

    def _save_checkpoint(self, model, trial):
        """`Trainer._save_checkpoint`, with the selection state (and the providers' states) written into the new
        checkpoint first: `Trainer` deletes old checkpoints (`save_total_limit`) at the end of its save, so a run
        killed there still leaves a complete newest checkpoint. Complete = `trainer_state.json` (written by `Trainer`
        after the weights and optimizer) and every rank's TIP state (see `train`)."""
        output_dir = checkpoint_dir(self, trial)
        os.makedirs(output_dir, exist_ok=True)
        if self.args.should_save:
            for provider in self._tip_stateful_providers():
                torch.save(provider.state_dict(), os.path.join(output_dir, provider.state_name))
        path = os.path.join(output_dir, TIP_STATE_NAME.format(rank=self.accelerator.process_index))
        torch.save(self._tip_state(), path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: present means whole
        if self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()  # every rank's state is written before rank 0 rotates
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`; with `resume_from_checkpoint=True` it resumes from the newest *complete* checkpoint.

        A run killed while saving leaves a checkpoint folder without its trainer state or TIP state, which `Trainer`
        would pick and fail on; such folders are skipped with a warning. A checkpoint is complete when it holds
        `trainer_state.json` (written after the weights and optimizer) and the TIP state of every rank (written before
        `Trainer` saves anything, so before it deletes old checkpoints); if none does (checkpoints written by
        another trainer), the newest holding `trainer_state.json` is used. The selection state (statistics, selector,
        signal providers such as ssToken's history model) is restored here, before `Trainer.train`, whatever loads
        the model weights (`Trainer` itself, DeepSpeed or FSDP).
        """
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            resume_from_checkpoint = self._last_complete_checkpoint(self.args.output_dir)
        if isinstance(resume_from_checkpoint, str):
            self._load_tip_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def _tip_stateful_providers(self) -> list:
        return [provider for provider in self._tip_provider_list() if provider.state_name]

    def _last_complete_checkpoint(self, output_dir: str) -> str:
        candidates = sort_checkpoints(output_dir) if os.path.isdir(output_dir) else []
        with_state = [c for c in candidates if os.path.isfile(os.path.join(c, TRAINER_STATE_NAME))]
        ranks = range(self.accelerator.num_processes)
        complete = [
            c for c in with_state if all(os.path.isfile(os.path.join(c, TIP_STATE_NAME.format(rank=r))) for r in ranks)
        ]
        chosen = (complete or with_state or [None])[-1]
        if chosen is None:
            raise ValueError(
                f"No complete checkpoint in {output_dir} to resume from (found {candidates or 'none'}); start without "
                "resume_from_checkpoint or pass the path of a checkpoint."
            )
        skipped = candidates[candidates.index(chosen) + 1 :]
        if skipped:
            logger.warning(
                f"Skipping incomplete checkpoint(s) {skipped} (a run interrupted while saving); resuming from {chosen}."
            )
        return chosen

    def _load_tip_state(self, checkpoint: str) -> None:
        """Restores the engine's state and the providers' states saved with `checkpoint` (warns if missing)."""
        for provider in self._tip_stateful_providers():
            provider_path = os.path.join(checkpoint, provider.state_name)
            if os.path.isfile(provider_path):
                provider.load_state_dict(torch.load(provider_path, map_location="cpu", weights_only=True))
            else:
                provider.state_missing(provider_path)
        path = os.path.join(checkpoint, TIP_STATE_NAME.format(rank=self.accelerator.process_index))
        if not os.path.isfile(path):
            logger.warning(
                f"{path} is missing ({checkpoint} was not written by a trl-tip trainer with this number of "
                "processes, or by a trl-tip version that wrote its state after the checkpoint rotation and was "
                "interrupted in between): the token statistics start empty and a stateful selector starts fresh."
            )
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.tip_engine.load_state_dict(state)
        self._tip_last_logged_step = int(state["last_logged_step"])
