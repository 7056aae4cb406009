"""The toy tokenizer round-trips through `save_pretrained` / `AutoTokenizer.from_pretrained`, next to a toy model
(transformers then rebuilds it as a byte-level `Qwen2Tokenizer`) or alone."""

import pytest
from transformers import AutoTokenizer

from trl_tip.toy import arithmetic_dataset, make_model, make_tokenizer


TEXTS = ["What is 12 + 34?", "  two  spaces, tabs? no: {a: [1, 2]} & 'quotes' ~ end", "12+34=46"]


@pytest.mark.parametrize("with_model", [True, False], ids=["next_to_model", "alone"])
def test_tokenizer_round_trips_with_spaces(tmp_path, with_model):
    tokenizer = make_tokenizer()
    if with_model:
        make_model(tokenizer, 32, 1).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == len(tokenizer)
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert reloaded(text, add_special_tokens=False)["input_ids"] == ids, text
        assert tokenizer.decode(ids) == text and reloaded.decode(ids) == text
    conversation = arithmetic_dataset(1)[0]["messages"] + [{"role": "user", "content": TEXTS[0]}]
    assert reloaded.apply_chat_template(conversation, tokenize=False) == tokenizer.apply_chat_template(
        conversation, tokenize=False
    )
    assert (
        reloaded.apply_chat_template(conversation)["input_ids"]
        == tokenizer.apply_chat_template(conversation)["input_ids"]
    )
    for name in ("pad_token", "eos_token", "unk_token"):
        assert getattr(reloaded, name) == getattr(tokenizer, name), name


def test_tokenizer_keeps_its_ids():
    """Token ids are those of the earlier character tokenizer (the quality results and tests rely on them)."""
    tokenizer = make_tokenizer()
    assert len(tokenizer) == 99
    assert tokenizer.convert_tokens_to_ids(["<pad>", "<|user|>", "<|assistant|>", "<|end|>", "0", "a", "~"]) == [
        0,
        1,
        2,
        3,
        4,
        14,
        97,
    ]
    assert tokenizer(" ", add_special_tokens=False)["input_ids"] == [98]


def test_quickstart_sample_is_the_demos_output():
    """docs/quickstart.md quotes what `trl-tip demo` prints for the saved default run, rendered by the demo's own
    printing code (so a change of the table or of the words shows here)."""
    from pathlib import Path

    from trl_tip.demo import DOC_BEGIN, DOC_END, doc_sample

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "quickstart.md").read_text()
    block = doc.split(DOC_BEGIN)[1].split(DOC_END)[0]
    sample = doc_sample(str(root / "benchmarks" / "results" / "demo" / "trainer_state.json"))
    assert block.strip() == f"```text\n{sample}\n```"
    assert "tokens/step" in sample and "kept share" in sample and "a high Q3 loss share means" in sample
