"""Three-digit addition with a short, program-written chain of thought: a task with checkable answers.

The user asks `a+b` (100 <= a, b <= 999); the assistant works the columns from the right, one step per column
(`digit+digit+carry=two-digit sum`), then writes `=` and the answer, e.g. `347+285` ->
`7+5+0=12 4+8+1=13 3+2+1=06 =632`. The completion is about 30 characters of the toy character tokenizer
(`trl_tip.toy.make_tokenizer`), so token selection has many positions to choose from, most of them easy
(copying digits) and a few hard (sums and carries). Train and test pairs are disjoint.
"""

from __future__ import annotations

import random

from datasets import Dataset


__all__ = ["answer_of", "chain_of_thought", "make_splits"]

LOW, HIGH = 100, 999


def chain_of_thought(a: int, b: int) -> str:
    """The assistant's completion for `a+b`: column steps from the right, then `=` and the sum."""
    steps, carry = [], 0
    for da, db in zip(reversed(str(a)), reversed(str(b)), strict=True):
        total = int(da) + int(db) + carry
        steps.append(f"{da}+{db}+{carry}={total:02d}")
        carry = total // 10
    return " ".join(steps) + f" ={a + b}"


def answer_of(completion: str) -> str | None:
    """The final answer of a completion (the text after the last ` =`), or `None` when it has none."""
    if " =" not in completion:
        return None
    return completion.rsplit(" =", 1)[1].strip()


def _rows(pairs: list[tuple[int, int]]) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"{a}+{b}"},
                {"role": "assistant", "content": chain_of_thought(a, b)},
            ],
            "answer": str(a + b),
        }
        for a, b in pairs
    ]


def make_splits(n_train: int, n_test: int, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Deterministic train and held-out test sets of distinct `a+b` pairs; no pair is in both.

    Returns:
        `(train, test)`, each with columns `messages` (user question, assistant chain of thought) and `answer`.
    """
    span = HIGH - LOW + 1
    if n_train + n_test > span * span:
        raise ValueError(f"n_train + n_test must be at most {span * span}, got {n_train + n_test}.")
    rng = random.Random(seed)
    codes = rng.sample(range(span * span), n_train + n_test)
    pairs = [(LOW + c // span, LOW + c % span) for c in codes]
    return Dataset.from_list(_rows(pairs[:n_train])), Dataset.from_list(_rows(pairs[n_train:]))
