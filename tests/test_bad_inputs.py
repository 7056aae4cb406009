"""Bad models, tokenizers and datasets: one clear error at construction, naming the problem and the fix."""

import copy

import pytest
from conftest import tiny_args
from datasets import Dataset

from trl_tip import TIPTrainer


def build(tmp_path, student, teacher, tokenizer, dataset, **kwargs):
    return TIPTrainer(
        model=student,
        teacher_model=teacher,
        args=tiny_args(tmp_path, max_steps=1),
        train_dataset=dataset,
        processing_class=tokenizer,
        **kwargs,
    )


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_vocabulary_mismatch_raises(tmp_path, student, teacher, tokenizer, dataset, which):
    (teacher if which == "teacher" else student).resize_token_embeddings(len(tokenizer) + 8)
    with pytest.raises(ValueError, match=r"vocab_size .* vocab_size .*same vocab_size"):
        build(tmp_path, student, teacher, tokenizer, dataset)


def test_tokenizer_without_pad_token_raises(tmp_path, student, teacher, tokenizer, dataset):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="does not have a pad token.*set `pad_token_id`"):
        build(tmp_path, student, teacher, tokenizer, dataset)


@pytest.mark.parametrize(
    "rows",
    [
        [{"text": "<|user|>1+1<|end|><|assistant|>2<|end|>"}],
        [{"prompt": "1+1", "completion": "2"}],
        [{"prompt": [{"role": "user", "content": "1+1"}], "completion": [{"role": "assistant", "content": "2"}]}],
    ],
    ids=["text", "prompt_completion", "conversational_prompt_completion"],
)
def test_dataset_without_messages_raises_at_construction(tmp_path, student, teacher, tokenizer, rows):
    """Before the check, this was a bare `KeyError: 'messages'` from the collator at the first training step."""
    bad = Dataset.from_list(rows * 4)
    with pytest.raises(
        ValueError, match=r"train_dataset has columns \[.*\].*reads a `messages` column.*data_collator"
    ):
        build(tmp_path, student, teacher, tokenizer, bad)


def test_eval_dataset_without_messages_raises(tmp_path, student, teacher, tokenizer, dataset):
    bad = Dataset.from_list([{"question": "1+1", "answer": "2"}] * 4)
    with pytest.raises(ValueError, match=r"eval_dataset\['dev'\] has columns \['question', 'answer'\]"):
        build(tmp_path, student, teacher, tokenizer, dataset, eval_dataset={"test": dataset, "dev": bad})


def test_custom_collator_skips_the_column_check(tmp_path, student, teacher, tokenizer, dataset):
    """A user collator may read any columns: the check applies only to GKD's default `messages` collator."""
    from trl.experimental.utils import DataCollatorForChatML

    collator = DataCollatorForChatML(tokenizer=tokenizer, messages_key="conversation")
    renamed = dataset.rename_column("messages", "conversation")
    trainer = build(tmp_path, student, teacher, tokenizer, renamed, data_collator=collator)
    trainer.train()
    assert any("tip/kept_frac" in log for log in trainer.state.log_history)


@pytest.mark.parametrize("split", ["train_dataset", "eval_dataset"])
def test_empty_dataset_raises_at_construction(tmp_path, student, teacher, tokenizer, dataset, split):
    """Before the check, an empty train_dataset stopped SFTTrainer's __init__ with a bare StopIteration."""
    empty = dataset.select([])
    kwargs = {"eval_dataset": empty} if split == "eval_dataset" else {}
    with pytest.raises(ValueError, match=rf"{split} is empty \(0 rows\)"):
        build(tmp_path, student, teacher, tokenizer, empty if split == "train_dataset" else dataset, **kwargs)


USER = {"role": "user", "content": "1+1"}
ASSISTANT = {"role": "assistant", "content": "2"}


@pytest.mark.parametrize(
    "conversation, found",
    [
        ([USER], "1 message\\(s\\), the last from 'user'"),
        ([USER, ASSISTANT, {"role": "user", "content": "and 2+2?"}], "3 message\\(s\\), the last from 'user'"),
        ([ASSISTANT], "1 message\\(s\\), the last from 'assistant'"),
        ([], "no message"),
    ],
    ids=["user_only", "ends_with_user", "assistant_only", "empty"],
)
def test_conversation_without_assistant_answer_raises(
    tmp_path, student, teacher, tokenizer, dataset, conversation, found
):
    """GKD's collator trains on the last message: a user turn there would be learnt silently (or fail at the first
    batch for a single message)."""
    good = dataset.select(range(5)).to_list()
    bad = Dataset.from_list(good + [{"messages": conversation}] + good)
    with pytest.raises(ValueError, match=rf"train_dataset has 1 conversation\(s\) .*\(first: row 5, {found}\)"):
        build(tmp_path, student, teacher, tokenizer, bad)


def test_conversation_check_reads_the_rows_of_a_view(tmp_path, student, teacher, tokenizer, dataset):
    """A shuffled / filtered dataset is an index mapping over its table: the rows checked are those of the view."""
    bad = Dataset.from_list(dataset.to_list() + [{"messages": [USER]}])
    view = bad.select(range(len(dataset))).shuffle(seed=0)  # the bad row is in the table but not in the view
    build(tmp_path, student, teacher, tokenizer, view)
    with pytest.raises(ValueError, match=r"eval_dataset has 1 conversation"):
        build(tmp_path, student, teacher, tokenizer, view, eval_dataset=bad.shuffle(seed=1))


def test_tokenizer_without_chat_template_raises_at_construction(tmp_path, student, teacher, tokenizer, dataset):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"has no chat template.*apply_chat_template"):
        build(tmp_path, student, teacher, tokenizer, dataset)


@pytest.mark.parametrize("config", ["TIPConfig", "TIPDistillationConfig"])
def test_use_liger_kernel_is_refused(tmp_path, config):
    import trl_tip

    with pytest.raises(ValueError, match=r"use_liger_kernel=True is not supported.*hidden states"):
        getattr(trl_tip, config)(output_dir=str(tmp_path), use_cpu=True, bf16=False, use_liger_kernel=True)


def test_dataset_smaller_than_one_step_warns(tmp_path, student, teacher, tokenizer, dataset, caplog):
    from transformers.utils import logging as hf_logging

    from trl_tip.trainers.data_checks import warn_short_dataset

    args = tiny_args(tmp_path, gradient_accumulation_steps=2)
    hf_logging.enable_propagation()
    with caplog.at_level("WARNING"):
        assert warn_short_dataset(dataset.select(range(3)), args)
        assert not warn_short_dataset(dataset.select(range(8)), args)
    (record,) = [r for r in caplog.records if "fewer than one optimizer step" in r.getMessage()]
    assert "train_dataset has 3 rows" in record.getMessage() and "= 8)" in record.getMessage()


def test_conversations_longer_than_max_length_are_counted_once(tmp_path, tokenizer, dataset, caplog):
    """GKD's collator keeps the last max_length tokens of a conversation, cutting the prompt's start silently."""
    from transformers.utils import logging as hf_logging

    from trl_tip.trainers.data_checks import count_long_conversations, warn_long_conversations

    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in dataset["messages"]]
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    cut = sorted(lengths)[len(lengths) // 2]
    expected = sum(n > cut for n in lengths)
    assert count_long_conversations(dataset, tokenizer, cut) == (expected, len(dataset), max(lengths))
    hf_logging.enable_propagation()
    with caplog.at_level("WARNING"):
        assert warn_long_conversations(dataset, tokenizer, cut, "train_dataset") == expected
        assert warn_long_conversations(dataset, tokenizer, max(lengths), "train_dataset") == 0
    (record,) = [r for r in caplog.records if "longer than max_length" in r.getMessage()]
    assert f"{expected} of the {len(dataset)} conversations" in record.getMessage()
