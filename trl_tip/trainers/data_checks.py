"""Checks of a GKD-style training set-up at construction, so that a bad dataset or tokenizer fails with a clear error
before the first batch rather than deep inside TRL's collator (used by `TIPTrainer`)."""

from __future__ import annotations

from typing import Any

from transformers.utils import logging


__all__ = [
    "check_chat_columns",
    "check_chat_template",
    "check_conversations",
    "check_not_empty",
    "count_long_conversations",
    "warn_long_conversations",
    "warn_short_dataset",
]

logger = logging.get_logger(__name__)
# Conversations tokenized to count those longer than max_length (the first ones of a larger dataset).
LONG_CHECK_ROWS = 10_000


def check_chat_columns(dataset: Any, name: str) -> None:
    """Raises a clear error if `dataset` lacks the `messages` column that GKD's default collator reads.

    `DataCollatorForChatML` tokenizes each example's `messages` (unless it is pre-tokenized with `input_ids`);
    without them training would stop at the first batch with a bare `KeyError: 'messages'`.
    """
    datasets = dataset.items() if isinstance(dataset, dict) else [(None, dataset)]
    for key, split in datasets:
        columns = getattr(split, "column_names", None)
        if not isinstance(columns, (list, tuple)) or "messages" in columns or "input_ids" in columns:
            continue  # no dataset, columns unknown (e.g. an IterableDataset without features), or usable
        label = name if key is None else f"{name}[{key!r}]"
        raise ValueError(
            f"{label} has columns {list(columns)}, but TIPTrainer (like GKDTrainer) reads a `messages` column: the "
            "conversation as a list of {'role': ..., 'content': ...} dicts ending with the assistant's answer. "
            "Convert it, e.g. dataset.map(lambda x: {'messages': [{'role': 'user', 'content': x['prompt']}, "
            "{'role': 'assistant', 'content': x['completion']}]}), or pass your own data_collator."
        )


def _splits(dataset: Any, name: str) -> list[tuple[str, Any]]:
    if dataset is None:
        return []
    if isinstance(dataset, dict):
        return [(f"{name}[{key!r}]", split) for key, split in dataset.items()]
    return [(name, dataset)]


def check_not_empty(dataset: Any, name: str) -> None:
    """Raises a clear error for a dataset with no rows (`SFTTrainer` would stop on a bare `StopIteration`)."""
    for label, split in _splits(dataset, name):
        try:
            size = len(split)
        except TypeError:
            continue  # an IterableDataset: its length is unknown
        if size == 0:
            raise ValueError(f"{label} is empty (0 rows); give it at least one row.")


def _conversation_shapes(split: Any) -> tuple[Any, Any] | None:
    """Number of messages and role of the last message of every row's `messages` (`None` if not readable as Arrow
    lists of `{role, content}` structs, e.g. an IterableDataset)."""
    if not hasattr(split, "with_format"):
        return None
    try:
        import pyarrow as pa
        import pyarrow.compute as pc

        column = split.with_format("arrow")["messages"]
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
        roles = column.values.field("role")
        last = column.offsets.to_numpy(zero_copy_only=False)[1:] - 1
    except Exception:  # noqa: BLE001 - another layout: left to the collator
        return None
    last_roles = [None] * len(lengths)
    if len(roles):
        taken = roles.take(pa.array(last.clip(0, len(roles) - 1))).to_pylist()
        last_roles = [role if length else None for role, length in zip(taken, lengths)]
    return lengths, last_roles


def check_conversations(dataset: Any, name: str) -> None:
    """Raises a clear error if a conversation cannot be trained on by GKD's collator.

    `DataCollatorForChatML` takes the last message as the completion and the messages before it as the prompt: a
    conversation must end with an assistant turn and have at least one message before it. A conversation ending with
    a user turn would otherwise train the student to write the user's message, silently; one with a single message
    fails at the first batch.
    """
    for label, split in _splits(dataset, name):
        columns = getattr(split, "column_names", None)
        if not isinstance(columns, (list, tuple)) or "messages" not in columns or "input_ids" in columns:
            continue
        shapes = _conversation_shapes(split)
        if shapes is None:
            continue
        lengths, last_roles = shapes
        bad = [i for i, (n, role) in enumerate(zip(lengths, last_roles)) if n < 2 or role != "assistant"]
        if bad:
            i = bad[0]
            found = "no message" if lengths[i] == 0 else f"{lengths[i]} message(s), the last from {last_roles[i]!r}"
            raise ValueError(
                f"{label} has {len(bad)} conversation(s) that do not end with an assistant turn after at least one "
                f"prompt message (first: row {i}, {found}). TIPTrainer (like GKDTrainer) trains on the last message "
                "as the completion and prompts with the messages before it. Drop or fix those rows, e.g. "
                "dataset.filter(lambda x: len(x['messages']) > 1 and x['messages'][-1]['role'] == 'assistant')."
            )


def check_chat_template(processing_class: Any, *datasets: Any) -> None:
    """Raises a clear error if GKD's collator would need a chat template the tokenizer does not have."""
    if processing_class is None or getattr(processing_class, "chat_template", None) is not None:
        return
    needs_template = any(
        "messages" in (getattr(split, "column_names", None) or []) and "input_ids" not in split.column_names
        for dataset in datasets
        for _, split in _splits(dataset, "dataset")
    )
    if needs_template:
        raise ValueError(
            f"processing_class ({type(processing_class).__name__}) has no chat template, and TIPTrainer (like "
            "GKDTrainer) formats each `messages` conversation with tokenizer.apply_chat_template. Use the tokenizer "
            "of an instruct/chat model, or set one: tokenizer.chat_template = '...' (a Jinja template)."
        )


def warn_short_dataset(dataset: Any, args: Any, name: str = "train_dataset") -> bool:
    """Warns (one line) when `dataset` has fewer rows than one optimizer step takes, so that every step trains on
    short batches. Returns whether it warned."""
    try:
        rows = len(dataset)
    except TypeError:
        return False  # an IterableDataset: its length is unknown
    per_device, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    processes = getattr(args, "world_size", 1)
    needed = per_device * accumulation * processes
    if dataset is None or rows >= needed:
        return False
    logger.warning(
        f"{name} has {rows} row{'s' if rows != 1 else ''}, fewer than one optimizer step takes "
        f"(per_device_train_batch_size {per_device} x gradient_accumulation_steps {accumulation} x {processes} "
        f"process{'es' if processes != 1 else ''} = {needed}): every step trains on short batches. Add rows or lower "
        "per_device_train_batch_size."
    )
    return True


def count_long_conversations(
    dataset: Any, tokenizer: Any, max_length: int, limit: int = LONG_CHECK_ROWS
) -> tuple[int, int, int]:
    """Counts the conversations of a `messages` dataset longer than `max_length` tokens once formatted with the chat
    template, as GKD's collator (`DataCollatorForChatML`) tokenizes them.

    Returns:
        `(long, checked, longest)`: conversations longer than `max_length`, conversations checked (the first `limit`),
        and the longest length seen.
    """
    checked = min(len(dataset), limit)
    rows = dataset.select(range(checked)) if checked < len(dataset) else dataset
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=False, tokenize=False) for m in rows["messages"]]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    return sum(n > max_length for n in lengths), checked, max(lengths, default=0)


def warn_long_conversations(dataset: Any, tokenizer: Any, max_length: int | None, name: str) -> int:
    """Warns once when conversations are longer than `max_length`: GKD's collator keeps their last `max_length`
    tokens, cutting the start of the prompt (its first role header) without a word. Returns how many were found."""
    for label, split in _splits(dataset, name):
        columns = getattr(split, "column_names", None)
        if max_length is None or tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            return 0
        if not isinstance(columns, (list, tuple)) or "messages" not in columns or "input_ids" in columns:
            continue
        try:
            long, checked, longest = count_long_conversations(split, tokenizer, max_length)
        except Exception:  # noqa: BLE001 - a layout the collator reads another way: not this check's concern
            continue
        if long:
            of = f"the first {checked}" if checked < len(split) else f"the {checked}"
            logger.warning(
                f"{label}: {long} of {of} conversations are longer than max_length={max_length} tokens (longest "
                f"{longest}); GKD's collator keeps their last {max_length} tokens, cutting the start of the prompt "
                "(its first role header included). Raise max_length or filter them."
            )
            return long
    return 0
