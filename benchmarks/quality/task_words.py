"""Word problems with several valid solutions, and a BPE vocabulary trained on them: a task whose teacher branches.

A problem lists three amounts of one kind of item, each a plain count (`17 red pens`) or a group
(`3 boxes of 8 pens`), in one of several wordings, and asks for the total. A solution first works out the groups, in
any order, then adds the three amounts up, in any order, one sum per step, and ends with `Answer: N`:

    Mia buys 3 boxes of 8 pens, 17 red pens and 2 bags of 5 pens. How many pens does Mia have?
    -> 2*5=10. 3*8=24. 17+10=27. 27+24=51. Answer: 51
    -> 3x8=24, 2x5=10, 24+10=34, 34+17=51, Answer: 51          (the same problem, another valid solution)

Every training completion is drawn at random among the valid orderings (`3!` orders of the sums times `g!` orders of
the `g` groups) and two notations (`*` or `x`, `. ` or `, ` between steps), so a teacher trained on them puts real
probability on several next tokens at each branch point, unlike the one-path chain of thought of `task.py`. Only
the final answer is scored ([`is_correct`]); [`steps_are_valid`] also checks every step, for diagnostics.

Text is tokenised by a byte-level BPE trained here on the generated corpus ([`train_tokenizer`]); digits are split
one per token, as in Qwen2's tokenizer, so the arithmetic is learnable by a small model and the words are subwords.
"""

from __future__ import annotations

import itertools
import random
import re

from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


__all__ = [
    "Problem",
    "answer_of",
    "is_correct",
    "make_problem",
    "make_splits",
    "render_question",
    "render_solution",
    "steps_are_valid",
    "train_tokenizer",
    "valid_solutions",
]

SPECIAL_TOKENS = ["<pad>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ANSWER_MARK = "Answer: "

# fmt: off
NAMES = [
    "Mia", "Noah", "Emma", "Liam", "Olivia", "Lucas", "Ava", "Ethan", "Sophia", "Mason", "Isabella", "Logan", "Amelia",
    "Elijah", "Harper", "Oliver", "Evelyn", "Jacob", "Abigail", "Aiden", "Emily", "James", "Ella", "Benjamin",
    "Scarlett", "Henry", "Grace", "Alexander", "Chloe", "Sebastian", "Victoria", "Daniel", "Riley", "Matthew", "Aria",
    "Samuel", "Lily", "David", "Zoey", "Joseph", "Penelope", "Carter", "Layla", "Owen", "Nora", "Wyatt", "Camila",
    "John", "Hannah", "Jack", "Addison", "Luke", "Eleanor", "Jayden", "Stella", "Dylan", "Natalie", "Gabriel", "Leah",
    "Isaac", "Hazel", "Anthony", "Violet", "Julian", "Aurora", "Levi", "Savannah", "Thomas", "Audrey", "Caleb",
    "Brooklyn", "Ryan", "Bella", "Nathan", "Claire", "Adrian", "Skylar", "Christian", "Lucy", "Hunter", "Paisley",
    "Eli", "Everly", "Jonathan", "Anna", "Connor", "Caroline", "Jeremiah", "Nova", "Cameron", "Genesis", "Josiah",
    "Emilia", "Robert", "Kennedy", "Nicholas", "Maya", "Aaron", "Willow", "Charles", "Naomi",
]
ITEMS = [
    "pens", "pencils", "apples", "oranges", "lemons", "plums", "peaches", "cherries", "grapes", "melons", "carrots",
    "onions", "potatoes", "tomatoes", "peppers", "cookies", "muffins", "cupcakes", "candles", "stickers", "marbles",
    "buttons", "beads", "shells", "stamps", "coins", "tickets", "cards", "books", "magazines", "notebooks", "erasers",
    "crayons", "markers", "brushes", "balloons", "ribbons", "flowers", "roses", "tulips", "daisies", "lilies", "eggs",
    "bottles", "cans", "jars", "cups", "plates", "bowls", "spoons", "forks", "knives", "napkins", "towels", "socks",
    "gloves", "hats", "scarves", "shirts", "buckets", "batteries", "bulbs", "screws", "nails", "bolts", "ropes",
    "blocks", "bricks", "tiles", "puzzles", "dolls", "robots", "kites", "yoyos", "whistles", "bells", "drums",
    "guitars", "violins", "sandwiches", "pretzels", "bagels", "donuts", "pancakes", "waffles", "biscuits", "crackers",
    "walnuts", "almonds", "peanuts", "chestnuts", "pebbles", "crystals", "feathers", "leaves", "acorns", "pinecones",
]
CONTAINERS = [
    "boxes", "bags", "baskets", "crates", "packs", "jars", "trays", "bundles", "cartons", "sacks", "buckets", "bins",
    "tins", "cases", "piles", "rows", "stacks", "sets", "bunches", "barrels",
]
ADJECTIVES = [
    "red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white", "silver", "golden",
    "small", "large", "tiny", "huge", "shiny", "old", "new", "fresh", "striped", "spotted", "wooden", "plastic",
]
VERBS = ["buys", "has", "finds", "collects", "gets", "keeps", "packs", "brings", "orders", "receives", "picks up"]
INTROS = [
    "{name} {verb} {parts}.",
    "At the market, {name} {verb} {parts}.",
    "On Monday {name} {verb} {parts}.",
    "For the party, {name} {verb} {parts}.",
    "In the morning, {name} {verb} {parts}.",
]
QUESTIONS = [
    "How many {item} does {name} have?",
    "How many {item} are there in total?",
    "What is the total number of {item}?",
    "How many {item} altogether?",
    "Count all the {item}.",
]
# fmt: on

MAX_COUNT = 40  # a plain count is 2..MAX_COUNT
MAX_FACTOR = 9  # a group is k of m, 2 <= k, m <= MAX_FACTOR
GROUP_PROBABILITY = 0.35
TERMS = 3


# A term is (k, m): k groups of m items; a plain count n is (1, n).
Problem = tuple[tuple[int, int], ...]


def make_problem(rng: random.Random) -> Problem:
    """Three random terms: plain counts `(1, n)` or groups `(k, m)`."""
    terms = []
    for _ in range(TERMS):
        if rng.random() < GROUP_PROBABILITY:
            terms.append((rng.randint(2, MAX_FACTOR), rng.randint(2, MAX_FACTOR)))
        else:
            terms.append((1, rng.randint(2, MAX_COUNT)))
    return tuple(terms)


def total(problem: Problem) -> int:
    """The answer: the sum of `k * m` over the terms."""
    return sum(k * m for k, m in problem)


def render_question(problem: Problem, rng: random.Random) -> str:
    """The problem in words: a random name, item, intro, question and description of each term."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    parts = []
    for k, m in problem:
        if k == 1:
            parts.append(f"{m} {rng.choice(ADJECTIVES)} {item}" if rng.random() < 0.6 else f"{m} {item}")
        else:
            parts.append(f"{k} {rng.choice(CONTAINERS)} of {m} {item}")
    text = ", ".join(parts[:-1]) + " and " + parts[-1]
    intro = rng.choice(INTROS).format(name=name, verb=rng.choice(VERBS), parts=text)
    return intro + " " + rng.choice(QUESTIONS).format(item=item, name=name)


def _steps(problem: Problem, group_order: tuple[int, ...], sum_order: tuple[int, ...], times: str) -> list[str]:
    steps = [f"{problem[i][0]}{times}{problem[i][1]}={problem[i][0] * problem[i][1]}" for i in group_order]
    values = [k * m for k, m in problem]
    acc = values[sum_order[0]]
    for i in sum_order[1:]:
        steps.append(f"{acc}+{values[i]}={acc + values[i]}")
        acc += values[i]
    return steps


def valid_solutions(problem: Problem) -> list[str]:
    """Every valid completion of `problem` (each group order × sum order × notation), without duplicates."""
    groups = [i for i, (k, _) in enumerate(problem) if k > 1]
    out = []
    for times, sep in itertools.product(("*", "x"), (". ", ", ")):
        for group_order in itertools.permutations(groups):
            for sum_order in itertools.permutations(range(len(problem))):
                steps = _steps(problem, group_order, sum_order, times)
                out.append(sep.join([*steps, f"{ANSWER_MARK}{total(problem)}"]))
    return list(dict.fromkeys(out))


def render_solution(problem: Problem, rng: random.Random) -> str:
    """One valid completion, drawn uniformly over group orders, sum orders and the two notations."""
    groups = [i for i, (k, _) in enumerate(problem) if k > 1]
    rng.shuffle(groups)
    order = list(range(len(problem)))
    rng.shuffle(order)
    times, sep = rng.choice(("*", "x")), rng.choice((". ", ", "))
    return sep.join([*_steps(problem, tuple(groups), tuple(order), times), f"{ANSWER_MARK}{total(problem)}"])


def answer_of(completion: str) -> str | None:
    """The final answer of a completion (the digits after the last `Answer: `), or `None` when it has none."""
    if ANSWER_MARK not in completion:
        return None
    match = re.match(r"\d+", completion.rsplit(ANSWER_MARK, 1)[1].strip())
    return match.group(0) if match else None


def is_correct(completion: str, answer: str) -> bool:
    """Whether the completion's final answer is `answer` (whatever path led there)."""
    return answer_of(completion) == answer


_STEP = re.compile(r"^(\d+)([*x+])(\d+)=(\d+)$")


def steps_are_valid(completion: str, problem: Problem) -> bool:
    """Whether every step is true arithmetic on the problem's amounts and the answer is the total.

    Each group `k*m` must be worked out once, every amount must be added once, starting from one amount and adding the
    others to the running sum, and the completion must end with the total.
    """
    body, mark, tail = completion.rpartition(ANSWER_MARK)
    if not mark or answer_of(completion) != str(total(problem)) or tail.strip() != str(total(problem)):
        return False
    steps = [s.strip() for s in re.split(r"[.,] ", body.strip()) if s.strip()]
    groups = sorted((k, m) for k, m in problem if k > 1)
    values = sorted(k * m for k, m in problem)
    seen_groups, added, acc = [], [], None
    for step in steps:
        match = _STEP.match(step.rstrip(".,"))
        if not match:
            return False
        a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
        if op in "*x":
            if a * b != c or acc is not None:
                return False
            seen_groups.append((a, b))
        else:
            if a + b != c:
                return False
            if acc is None:
                added.append(a)
            elif a != acc:
                return False
            added.append(b)
            acc = c
    return sorted(seen_groups) == groups and sorted(added) == values and acc == total(problem)


def _row(problem: Problem, rng: random.Random) -> dict:
    return {
        "messages": [
            {"role": "user", "content": render_question(problem, rng)},
            {"role": "assistant", "content": render_solution(problem, rng)},
        ],
        "answer": str(total(problem)),
        "terms": [list(t) for t in problem],
    }


def make_splits(n_train: int, n_test: int, seed: int = 0, n_dev: int = 0) -> tuple[Dataset, ...]:
    """Deterministic train, held-out test (and dev) sets; no numeric problem is in two of them.

    A problem is its terms (the wording is drawn separately), so a test problem never appears in training in other
    words. Training problems may repeat with other wordings and solutions.

    Returns:
        `(train, test)`, or `(train, test, dev)` when `n_dev > 0`; columns `messages` (user question, assistant
        solution), `answer` and `terms`.
    """
    rng = random.Random(seed)
    held_out: list[Problem] = []
    seen: set[Problem] = set()
    while len(held_out) < n_test + n_dev:
        problem = make_problem(rng)
        if problem not in seen:
            seen.add(problem)
            held_out.append(problem)
    train = []
    while len(train) < n_train:
        problem = make_problem(rng)
        if problem not in seen:
            train.append(problem)
    splits = [train, held_out[:n_test]] + ([held_out[n_test:]] if n_dev else [])
    return tuple(Dataset.from_list([_row(p, rng) for p in split]) for split in splits)


def corpus(n: int = 20000, seed: int = 99) -> list[str]:
    """Texts for training the tokenizer: questions and solutions of random problems, and every word list."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        problem = make_problem(rng)
        texts += [render_question(problem, rng), render_solution(problem, rng)]
    return texts + [" ".join(words) for words in (NAMES, ITEMS, CONTAINERS, ADJECTIVES, VERBS)]


def train_tokenizer(vocab_size: int = 1200, n_texts: int = 20000) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the generated corpus, digits one per token, with the chat template.

    Deterministic: the same arguments give the same vocabulary.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(n_texts), trainer=trainer)
    return wrap_tokenizer(backend)


def wrap_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """The `transformers` tokenizer (pad, end and role tokens, chat template) around a trained backend."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<|end|>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 256
    return tokenizer
