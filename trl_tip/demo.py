"""A tiny end-to-end distillation on CPU: pretrain a small teacher on arithmetic, distil it into a smaller student
with `TIPTrainer`, and print the Q1–Q4 table of the run. Nothing is downloaded."""

from __future__ import annotations

import argparse
import os

from .config import TIPConfig
from .selection import TOKEN_SELECTIONS
from .stats import METRIC_PREFIX, format_quadrant_table
from .token_dump import TokenDumpCallback
from .toy import arithmetic_dataset, make_model, make_tokenizer, pretrain
from .trainers import TIPTrainer


__all__ = ["format_quadrant_table", "main", "run_demo"]


def run_demo(
    output_dir: str = "runs/demo",
    token_selection: str = "tip",
    keep_ratio: float | None = 0.5,
    max_steps: int = 20,
    teacher_steps: int = 300,
    student_steps: int = 40,
    seed: int = 0,
    dump_tokens_every: int | None = None,
    dump_completions: int = 4,
) -> TIPTrainer:
    """Runs the demo and returns the trainer (its `state.log_history` holds the metrics).

    Args:
        output_dir (`str`): Where the run writes its checkpoint, `trainer_state.json` and logs.
        token_selection (`str`): Selection rule.
        keep_ratio (`float`, *optional*): Kept share for budgeted rules (ignored for `all` and `quadrants`).
        max_steps (`int`): Distillation steps.
        teacher_steps (`int`): Steps of plain training that make the teacher competent.
        student_steps (`int`): Steps of plain training of the student first (competent but clearly worse).
        seed (`int`): Seed of everything.
        dump_tokens_every (`int`, *optional*): Add a [`TokenDumpCallback`] that writes the per-token signals of
            `dump_completions` completions to `output_dir/tip_tokens.jsonl` every that many steps.
        dump_completions (`int`): Completions per dump.
    """
    tokenizer = make_tokenizer()
    train = arithmetic_dataset(512, seed=seed)
    teacher = pretrain(make_model(tokenizer, 128, 4, seed=seed + 1), tokenizer, train, steps=teacher_steps, seed=seed)
    student = make_model(tokenizer, 64, 2, seed=seed + 2)
    if student_steps > 0:
        student = pretrain(student, tokenizer, train, steps=student_steps, seed=seed + 1)
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
    callbacks = [TokenDumpCallback(dump_tokens_every, dump_completions)] if dump_tokens_every else None
    trainer = TIPTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train()
    trainer.save_state()
    return trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="trl-tip demo", description=__doc__)
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--token_selection", default="tip", choices=TOKEN_SELECTIONS)
    parser.add_argument("--keep_ratio", type=float, default=0.5)
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--teacher_steps", type=int, default=300)
    parser.add_argument("--student_steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dump_tokens_every",
        type=int,
        default=None,
        help="write per-token signals of a few completions to OUTPUT_DIR/tip_tokens.jsonl every N steps "
        "(for `trl-tip report`)",
    )
    parser.add_argument("--dump_completions", type=int, default=4, help="completions per token dump")
    ns = parser.parse_args(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    trainer = run_demo(
        ns.output_dir,
        ns.token_selection,
        ns.keep_ratio,
        ns.max_steps,
        ns.teacher_steps,
        ns.student_steps,
        ns.seed,
        dump_tokens_every=ns.dump_tokens_every,
        dump_completions=ns.dump_completions,
    )
    step_logs = [log for log in trainer.state.log_history if f"{METRIC_PREFIX}/kept_frac" in log]
    print(f"\ntrl-tip demo: token_selection={ns.token_selection}, {len(step_logs)} logging steps")
    print(f"loss: first {step_logs[0]['loss']:.4f} -> last {step_logs[-1]['loss']:.4f}")
    print(f"Q1-Q4 at step {step_logs[-1]['step']}:")
    print(format_quadrant_table(step_logs[-1]))
    print(f"trainer_state.json and checkpoint in {ns.output_dir}")


if __name__ == "__main__":
    main()
