"""`TokenDumpCallback`: every N steps, writes the per-token signals of a few completions to JSONL.

`trl-tip report` reads the file to draw the TIP map (entropy against divergence, coloured by quadrant) and an HTML
page of completions with the kept tokens highlighted.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .callbacks import SelectionCallback


__all__ = ["TOKEN_DUMP_NAME", "TokenDumpCallback", "selection_dict", "token_records"]

TOKEN_DUMP_NAME = "tip_tokens.jsonl"


def _decode_one(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return f"<{token_id}>"
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def selection_dict(record) -> dict[str, Any]:
    """The fields of a [`SelectionRecord`] that [`token_records`] reads, as a dict (detached, on the CPU)."""
    return {
        "input_ids": record.input_ids.cpu(),
        "attention_mask": record.attention_mask.cpu(),
        "labels": record.labels.cpu(),
        "signals": record.signals,
        "quadrant": record.quadrant.cpu(),
        "weights": record.weights.cpu(),
        "entropy_threshold": float(record.entropy_threshold),
        "divergence_threshold": float(record.divergence_threshold),
    }


def token_records(selection: dict[str, Any], tokenizer: Any = None, max_completions: int | None = None) -> list[dict]:
    """Turns one micro-batch's selection into one record per completion.

    Args:
        selection (`dict`): [`selection_dict`] of a [`SelectionRecord`] plus the `step`: `input_ids`,
            `attention_mask`, `labels` `(B, T)`, the [`TokenSignals`] `signals` of the `N` eligible positions, their
            `quadrant` and selection `weights` `(N,)`, `entropy_threshold`, `divergence_threshold` and `step`.
        tokenizer (*optional*): Decodes token ids to text (`<id>` if `None`).
        max_completions (`int`, *optional*): Keep the first rows of the micro-batch only (all if `None`).

    Returns:
        `list[dict]`: Per completion: `step`, `row`, `prompt` (text), `entropy_threshold`, `divergence_threshold`
        and `tokens`, a list with, per completion token, `position`, `token_id`, `token`, `entropy`, `divergence`,
        `loss`, `student_prob`, `teacher_prob`, `weight`, `kept` and `quadrant` (1–4; 0 for a non-finite position).
    """
    signals = selection["signals"]
    input_ids = selection["input_ids"].cpu()
    attention_mask = selection["attention_mask"].cpu()
    labels = selection["labels"].cpu()
    seq_idx, pos_idx = signals.seq_idx.cpu(), signals.pos_idx.cpu()
    columns = {
        "entropy": signals.entropy,
        "divergence": signals.divergence,
        "loss": signals.loss,
        "student_prob": signals.student_log_prob.exp(),
        "teacher_prob": signals.teacher_log_prob.exp(),
        "weight": selection["weights"],
        "quadrant": selection["quadrant"],
    }
    columns = {name: value.detach().float().cpu().tolist() for name, value in columns.items()}
    rows = sorted(set(seq_idx.tolist()))
    if max_completions is not None:
        rows = rows[:max_completions]
    records = []
    for row in rows:
        labelled = (labels[row] != -100).nonzero(as_tuple=True)[0]
        first = int(labelled[0]) if labelled.numel() else labels.size(1)
        prompt_ids = [
            int(t) for t, m in zip(input_ids[row, :first].tolist(), attention_mask[row, :first].tolist()) if m
        ]
        tokens = []
        for i in (seq_idx == row).nonzero(as_tuple=True)[0].tolist():
            position = int(pos_idx[i]) + 1  # the shifted position p predicts the token at p + 1
            token_id = int(input_ids[row, position])
            weight = columns["weight"][i]
            tokens.append(
                {
                    "position": position,
                    "token_id": token_id,
                    "token": _decode_one(tokenizer, token_id),
                    "entropy": columns["entropy"][i],
                    "divergence": columns["divergence"][i],
                    "loss": columns["loss"][i],
                    "student_prob": columns["student_prob"][i],
                    "teacher_prob": columns["teacher_prob"][i],
                    "weight": weight,
                    "kept": weight > 0,
                    "quadrant": int(columns["quadrant"][i]),
                }
            )
        # Token by token, like the completion, so that the prompt reads as the model saw it.
        prompt = "".join(_decode_one(tokenizer, t) for t in prompt_ids)
        records.append(
            {
                "step": int(selection["step"]),
                "row": int(row),
                "prompt": prompt,
                "entropy_threshold": float(selection["entropy_threshold"]),
                "divergence_threshold": float(selection["divergence_threshold"]),
                "tokens": tokens,
            }
        )
    return records


class TokenDumpCallback(SelectionCallback):
    """Every `every_n_steps` optimizer steps, appends the per-token signals of a few completions to JSONL.

    Pass it to [`TIPTrainer`] or [`TIPDistillationTrainer`] (`callbacks=[TokenDumpCallback()]` or
    `trainer.add_callback(...)`). It observes the selection engine: on the steps it dumps, it keeps the
    [`SelectionRecord`] of the step's last training micro-batch (on the main process), and at the end of the step it
    writes one JSON line per completion (see [`token_records`]) to `output_dir/tip_tokens.jsonl`. On several processes
    the file holds the main process's completions.

    Args:
        every_n_steps (`int`, *optional*, defaults to `10`): Dump at steps `every_n_steps, 2 * every_n_steps, ...`.
        max_completions (`int`, *optional*, defaults to `4`): Completions (rows of the micro-batch) per dump.
        filename (`str`, *optional*, defaults to `"tip_tokens.jsonl"`): File name inside `args.output_dir`.
    """

    def __init__(self, every_n_steps: int = 10, max_completions: int = 4, filename: str = TOKEN_DUMP_NAME):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        if max_completions < 1:
            raise ValueError(f"max_completions must be >= 1, got {max_completions}.")
        self.every_n_steps = int(every_n_steps)
        self.max_completions = int(max_completions)
        self.filename = filename
        self.pending = None

    def _due(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._require_engine()

    def on_selection(self, record, engine) -> None:
        # The micro-batch belongs to optimizer step `global_step + 1` (global_step counts the completed ones).
        if record.training and engine.processes.process_index == 0 and self._due(record.global_step + 1):
            if record.input_ids is None:
                raise RuntimeError(
                    "TokenDumpCallback needs the token ids in the selection record; the trainer gave none."
                )
            self.pending = record

    def on_step_end(self, args, state, control, **kwargs):
        record, self.pending = self.pending, None
        if record is None or not state.is_world_process_zero or not self._due(state.global_step):
            return
        selection = dict(selection_dict(record), step=state.global_step)
        records = token_records(selection, kwargs.get("processing_class"), self.max_completions)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, self.filename), "a", encoding="utf-8") as f:
            for line in records:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")

    def __repr__(self) -> str:
        return (
            f"TokenDumpCallback(every_n_steps={self.every_n_steps}, max_completions={self.max_completions}, "
            f"filename={self.filename!r})"
        )
