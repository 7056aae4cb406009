"""Tiny offline building blocks: a character tokenizer, small Qwen2-shaped models and an arithmetic dataset.

They need no download, so the demo and the tests run on a fresh CPU machine. The task: the user asks `a+b` or
`a-b`, the assistant answers the number.
"""

from __future__ import annotations

import random
import string

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from tqdm.auto import trange
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM


__all__ = ["arithmetic_dataset", "make_model", "make_tokenizer", "pretrain"]

SPECIAL_TOKENS = ["<pad>", "<|user|>", "<|assistant|>", "<|end|>"]
BYTE_LEVEL_SPACE = "\u0120"  # "Ġ": the byte-level alphabet's name for the space byte
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over digits, letters and punctuation, with a chat template and a pad token.

    It is byte-level in Qwen2's layout (a space is the token `Ġ`, no merges, so every character is one token;
    characters outside the alphabet are dropped, as a Qwen2 tokenizer drops bytes missing from its vocabulary), so
    that `save_pretrained` + `AutoTokenizer.from_pretrained` round-trips next to a model from [`make_model`]:
    transformers rebuilds the tokenizer of a Qwen2 checkpoint as a `Qwen2Tokenizer` from its vocabulary, whatever
    class saved it.
    """
    chars = list(string.digits + string.ascii_letters + string.punctuation) + [BYTE_LEVEL_SPACE]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<|end|>",
        unk_token="?",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 128
    return tokenizer


def make_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Qwen2ForCausalLM:
    """A small Qwen2 causal LM with random weights for `tokenizer`'s vocabulary."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _problem(rng: random.Random, max_operand: int) -> tuple[str, str]:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    if rng.random() < 0.5:
        return f"{a}+{b}", str(a + b)
    return f"{a}-{b}", str(a - b)


def arithmetic_dataset(n: int = 64, seed: int = 0, max_operand: int = 99) -> Dataset:
    """`n` conversations `{"messages": [user: "a+b", assistant: "c"]}` with correct answers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, answer = _problem(rng, max_operand)
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return Dataset.from_list(rows)


def pretrain(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    dataset: Dataset,
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    progress: str | None = None,
) -> Qwen2ForCausalLM:
    """Plain next-token training on the answers of `dataset` (used to make a teacher that knows the task).

    Args:
        progress (`str`, *optional*): Draw a progress bar with this description.

    Returns:
        The same `model`, trained, in eval mode.
    """
    torch.manual_seed(seed)
    texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in dataset]
    prompts = [
        tokenizer.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
        for row in dataset
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    rng = random.Random(seed)
    for _ in trange(steps, desc=progress, disable=progress is None, dynamic_ncols=True):
        idx = rng.sample(range(len(texts)), min(batch_size, len(texts)))
        batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        for row, i in enumerate(idx):
            labels[row, : len(tokenizer(prompts[i], add_special_tokens=False)["input_ids"])] = -100
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model
