"""A tiny end-to-end distillation on CPU: pretrain a small teacher on arithmetic, distil it into a smaller student
with `TIPTrainer`, and print the Q1–Q4 table of the run. Nothing is downloaded."""

from __future__ import annotations

import argparse
import textwrap

from transformers.trainer_callback import ProgressCallback

from .config import TIPConfig
from .selection import TOKEN_SELECTIONS
from .stats import METRIC_PREFIX, format_quadrant_table
from .token_dump import TokenDumpCallback
from .toy import arithmetic_dataset, make_model, make_tokenizer, pretrain
from .trainers import TIPTrainer


__all__ = [
    "DEMO_TOKEN_SELECTION",
    "QuietProgressCallback",
    "format_quadrant_table",
    "format_summary",
    "main",
    "run_demo",
]

# The demo's rule: the TIP paper's type-aware rule, which shows the quadrants at work. `TIPConfig` defaults to
# `entropy_sample` (the paper's 50% entropy rule), the safer choice for real runs (see docs/quality.md).
DEMO_TOKEN_SELECTION = "tip"
WIDTH = 100  # of the wrapped lines of the summary


class QuietProgressCallback(ProgressCallback):
    """`ProgressCallback` that draws the progress bar but does not print the log dicts under it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def run_demo(
    output_dir: str = "runs/demo",
    token_selection: str = DEMO_TOKEN_SELECTION,
    keep_ratio: float | None = 0.5,
    max_steps: int = 20,
    teacher_steps: int = 300,
    student_steps: int = 40,
    seed: int = 0,
    dump_tokens_every: int | None = None,
    dump_completions: int = 4,
    verbose: bool = True,
) -> TIPTrainer:
    """Runs the demo and returns the trainer (its `state.log_history` holds the metrics).

    Args:
        output_dir (`str`): Where the run writes its checkpoint, `trainer_state.json` and logs.
        token_selection (`str`): Selection rule (default `"tip"`; `TIPConfig`'s default is `"entropy_sample"`).
        keep_ratio (`float`, *optional*): Kept share for budgeted rules (ignored for `all` and `quadrants`).
        max_steps (`int`): Distillation steps.
        teacher_steps (`int`): Steps of plain training that make the teacher competent.
        student_steps (`int`): Steps of plain training of the student first (competent but clearly worse).
        seed (`int`): Seed of everything.
        dump_tokens_every (`int`, *optional*): Add a [`TokenDumpCallback`] that writes the per-token signals of
            `dump_completions` completions to `output_dir/tip_tokens.jsonl` every that many steps.
        dump_completions (`int`): Completions per dump.
        verbose (`bool`): Print the Trainer's log dicts under the progress bar (as any `Trainer` does); `False`
            draws the progress bars only.
    """
    # The config first: a bad option fails before the models are pretrained.
    extra = {"quadrants": ["Q3"]} if token_selection == "quadrants" else {}
    if token_selection in ("all", "quadrants"):
        keep_ratio = None
    args = TIPConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        seed=seed,
        max_steps=max_steps,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        lmbda=1.0,
        beta=0.5,
        temperature=1.0,
        max_new_tokens=8,
        logging_steps=max(1, max_steps // 4),
        save_strategy="steps",
        save_steps=max_steps,
        report_to="none",
        token_selection=token_selection,
        keep_ratio=keep_ratio,
        **extra,
    )
    tokenizer = make_tokenizer()
    train = arithmetic_dataset(512, seed=seed)
    progress = None if verbose else "pretraining the teacher"
    teacher = make_model(tokenizer, 128, 4, seed=seed + 1)
    teacher = pretrain(teacher, tokenizer, train, steps=teacher_steps, seed=seed, progress=progress)
    student = make_model(tokenizer, 64, 2, seed=seed + 2)
    if student_steps > 0:
        progress = None if verbose else "pretraining the student"
        student = pretrain(student, tokenizer, train, steps=student_steps, seed=seed + 1, progress=progress)
    callbacks = [TokenDumpCallback(dump_tokens_every, dump_completions)] if dump_tokens_every else None
    trainer = TIPTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if not verbose:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(QuietProgressCallback())
    trainer.train()
    trainer.save_state()
    return trainer


def format_summary(log_history: list[dict[str, float]], token_selection: str, output_dir: str) -> str:
    """What `trl-tip demo` prints after training: the loss, the Q1–Q4 table of the last logging step with a legend,
    one line on Q3 and where the run is.

    Args:
        log_history (`list[dict]`): `trainer.state.log_history` of the run.
        token_selection (`str`): The rule the run used.
        output_dir (`str`): The run's folder.
    """
    p = METRIC_PREFIX
    logs = [log for log in log_history if f"{p}/kept_frac" in log]
    if not logs:
        raise ValueError("The run logged no tip/... metrics; give --max_steps >= 1.")
    last = logs[-1]
    q3_share, q3_loss, q3_kept = (last[f"{p}/q3/{key}"] for key in ("frac", "loss_share", "kept_frac"))
    return "\n".join(
        [
            f"trl-tip demo: token_selection={token_selection}; loss {logs[0]['loss']:.4f} at step {logs[0]['step']} "
            f"-> {last['loss']:.4f} at step {last['step']}",
            f"Q1-Q4 at step {last['step']} (H: student entropy, D: teacher-student divergence; high/low: above/below "
            "the step's median):",
            format_quadrant_table(last),
            textwrap.fill(
                "tokens/step, kept/step: counts per optimizer step; share: of all tokens; kept share: of the "
                "quadrant's tokens; loss share: of the loss over all tokens.",
                width=WIDTH,
            ),
            textwrap.fill(
                f"Q3 (the student is confident, the teacher disagrees) holds {q3_loss:.0%} of the loss on "
                f"{q3_share:.0%} of the tokens, and {token_selection} kept {q3_kept:.0%} of them: a high Q3 loss share "
                "means confident mistakes carry much of the signal, which q3_score and quadrant_budget keep first.",
                width=WIDTH,
            ),
            f"trainer_state.json and checkpoint in {output_dir}; `trl-tip report {output_dir}` draws the run.",
        ]
    )


DOC_BEGIN, DOC_END = "<!-- demo-output: begin -->", "<!-- demo-output: end -->"


def doc_sample(run: str = "benchmarks/results/demo/trainer_state.json") -> str:
    """The quickstart's sample output: the header and summary `trl-tip demo` prints, from the `log_history` of a
    default demo run (saved by `trl-tip demo --output_dir runs/demo` in `runs/demo/trainer_state.json`)."""
    import json

    with open(run, encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    return "\n".join(
        [
            header(300, 40, 20, DEMO_TOKEN_SELECTION, 0.5),
            "",
            format_summary(history, DEMO_TOKEN_SELECTION, "runs/demo"),
        ]
    )


def header(teacher_steps: int, student_steps: int, max_steps: int, token_selection: str, keep_ratio) -> str:
    """The first line `trl-tip demo` prints."""
    return (
        f"trl-tip demo: a {teacher_steps}-step teacher and a {student_steps}-step student on arithmetic, then "
        f"{max_steps} distillation steps with token_selection={token_selection}"
        + (f", keep_ratio={keep_ratio}" if keep_ratio is not None else "")
    )


def make_parser() -> argparse.ArgumentParser:
    """The argument parser of `trl-tip demo`."""
    parser = argparse.ArgumentParser(
        prog="trl-tip demo",
        description=__doc__ + " Takes about two minutes on two CPU cores.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output_dir", default="runs/demo", help="where the checkpoint and trainer_state.json go")
    parser.add_argument(
        "--token_selection",
        default=DEMO_TOKEN_SELECTION,
        choices=TOKEN_SELECTIONS,
        help="selection rule; the demo uses tip (the TIP paper's type-aware rule, it shows the quadrants at work), "
        "while TIPConfig defaults to entropy_sample",
    )
    parser.add_argument(
        "--keep_ratio", type=float, default=0.5, help="share of the tokens kept (not used by all and quadrants)"
    )
    parser.add_argument("--max_steps", type=int, default=20, help="distillation steps")
    parser.add_argument("--teacher_steps", type=int, default=300, help="plain training steps that make the teacher")
    parser.add_argument(
        "--student_steps", type=int, default=40, help="plain training steps of the student before distillation"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of models, data, sampling and selection")
    parser.add_argument(
        "--dump_tokens_every",
        type=int,
        default=None,
        help="write per-token signals of a few completions to OUTPUT_DIR/tip_tokens.jsonl every N steps "
        "(for `trl-tip report`)",
    )
    parser.add_argument("--dump_completions", type=int, default=4, help="completions per token dump")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="print the Trainer's log dict at every logging step, and third-party notices, as any Trainer run does",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    ns = make_parser().parse_args(argv)
    if not ns.verbose:
        from transformers.utils import logging as hf_logging

        from .cli import quiet_third_party_noise

        quiet_third_party_noise()
        hf_logging.disable_progress_bar()  # the "Writing model shards" bar of each save
    keep_ratio = None if ns.token_selection in ("all", "quadrants") else ns.keep_ratio
    print(header(ns.teacher_steps, ns.student_steps, ns.max_steps, ns.token_selection, keep_ratio), flush=True)
    trainer = run_demo(
        ns.output_dir,
        ns.token_selection,
        keep_ratio,
        ns.max_steps,
        ns.teacher_steps,
        ns.student_steps,
        ns.seed,
        dump_tokens_every=ns.dump_tokens_every,
        dump_completions=ns.dump_completions,
        verbose=ns.verbose,
    )
    print("\n" + format_summary(trainer.state.log_history, ns.token_selection, ns.output_dir), flush=True)


if __name__ == "__main__":
    import sys

    from trl_tip.cli import main as cli_main

    cli_main(["demo", *sys.argv[1:]])
