"""The two tasks of the quality study as the harness (`study.py`) sees them: tokenizer, splits, decoding, checker.

- `addition` (`task.py`): three-digit addition with a one-path, program-written chain of thought, character
  tokenizer (98 tokens). The teacher's next token is (almost) always determined.
- `words` (`task_words.py`): word problems with several valid solution orders and two notations, a byte-level BPE
  vocabulary of about 1.2k tokens trained on the generated corpus. The teacher's distribution branches.

Each task also names the class of every completion token (`token_classes`), so the harness can report *where* each
rule trains (which kinds of tokens it keeps) on completions whose layout varies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import task as addition_task
import task_words
from transformers import PreTrainedTokenizerFast

from trl_tip.toy import make_tokenizer


__all__ = ["TASKS", "TaskSpec"]


@dataclass(frozen=True)
class TaskSpec:
    """A task of the quality study.

    Attributes:
        name: Key in [`TASKS`].
        max_new_tokens: Generation length of rollouts and evaluation (longest completion plus the end token).
        teacher_size: Default `(hidden, layers)` of the teacher.
        student_size: Default `(hidden, layers)` of the student.
        teacher_target: Default held-out accuracy at which the teacher's training stops.
        student_eval_every: Default steps between the student's evaluations (how closely a strength is hit).
    """

    name: str
    max_new_tokens: int
    teacher_size: tuple[int, int]
    student_size: tuple[int, int]
    teacher_target: float
    student_eval_every: int

    def new_tokenizer(self) -> PreTrainedTokenizerFast:
        """The task's tokenizer, built from scratch (the BPE of `words` is trained here, deterministically)."""
        return make_tokenizer() if self.name == "addition" else task_words.train_tokenizer()

    def splits(self, n_train: int, n_test: int, n_dev: int):
        """`(train, test, dev)` datasets with columns `messages` and `answer`; the three share no problem."""
        if self.name == "addition":
            train, held_out = addition_task.make_splits(n_train, n_test + n_dev, seed=1234)
            return train, held_out.select(range(n_test)), held_out.select(range(n_test, n_test + n_dev))
        return task_words.make_splits(n_train, n_test, seed=1234, n_dev=n_dev)

    def decode(self, tokenizer: PreTrainedTokenizerFast, ids: list[int]) -> str:
        """The text of a generated completion, up to its first end token."""
        if tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(tokenizer.eos_token_id)]
        special = set(tokenizer.all_special_ids)
        # Both tokenizers are byte-level (a space is the token `Ġ`): `decode`, not the joined tokens, gives the text.
        return tokenizer.decode([i for i in ids if i not in special])

    def is_correct(self, completion: str, answer: str) -> bool:
        """Whether the completion's final answer is `answer`."""
        if self.name == "addition":
            return addition_task.answer_of(completion) == answer
        return task_words.is_correct(completion, answer)

    def token_classes(self, pieces: list[str]) -> list[str]:
        """The class of each completion token, given the text of each token in order.

        Classes: `result` (a digit after `=`, i.e. the outcome of a step), `answer` (a digit of the final answer),
        `operand` (any other digit), `operator` (`+ * x =`), `separator` (spaces and punctuation between steps),
        `word` (anything else, e.g. `Answer`), `end` (the end token).
        """
        classes = []
        state = "operand"
        for piece in pieces:
            if piece == "<|end|>":
                classes.append("end")
                continue
            text = piece.replace("Ġ", " ")
            stripped = text.strip()
            if stripped.isdigit():
                classes.append(state if state in ("result", "answer") else "operand")
            elif stripped in ("+", "*", "x", "="):
                classes.append("operator")
                state = "result" if stripped == "=" else "operand"
            elif stripped == "" or re.fullmatch(r"[.,:;]+", stripped):
                classes.append("separator")
                if state == "result" or (self.name == "addition" and stripped == ""):
                    state = "operand"
                if self.name == "words" and ":" in stripped:
                    state = "answer"
            else:
                classes.append("word")
                state = "answer" if "Answer" in text else "operand"
            if self.name == "addition" and stripped == "=" and classes[-2:-1] == ["separator"]:
                state = "answer"  # ` =632`: the final answer
        return classes


TASKS = {
    # The addition student jumps from ~0.5 to ~0.9 within 100 steps (batch 64): evaluate it often, and train the
    # teacher further than the strong student gets.
    "addition": TaskSpec(
        "addition", 34, teacher_size=(192, 3), student_size=(64, 2), teacher_target=0.99, student_eval_every=5
    ),  # fmt: skip
    "words": TaskSpec(
        "words", 56, teacher_size=(256, 4), student_size=(128, 2), teacher_target=0.95, student_eval_every=25
    ),  # fmt: skip
}
TOKEN_CLASSES = ("operand", "operator", "result", "separator", "word", "answer", "end")
