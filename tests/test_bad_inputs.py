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
