"""Peak GPU memory of a recipe, measured offline: random-weight models of the recipe's exact shapes.

No download: the student and teacher are built from their architecture hyperparameters (below) with random weights,
saved to a temporary folder, and the recipe is run through `trl-tip train` for a few steps with those folders and a
synthetic dataset of long prompts. A random student rarely emits EOS, so every completion runs to `max_new_tokens`:
the lengths are the recipe's worst case. Prints one line: recipe, peak allocated and peak reserved GiB.

    python benchmarks/recipe_memory.py recipes/qwen2.5-0.5b-from-1.5b/lora_tip.yaml --steps 2
    python benchmarks/recipe_memory.py recipes/qwen2.5-0.5b-from-1.5b/lora_tip.yaml --tiny   # CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402


# Architecture hyperparameters of the models the recipes were written for (from their config.json).
SHAPES = {
    "Qwen/Qwen2.5-0.5B-Instruct": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2
    ),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2
    ),
}
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)


def _save_random_model(name: str, path: str, tokenizer, tiny: bool, device: str) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if not tiny and name not in SHAPES:
        raise ValueError(f"No shapes for {name}; add its config.json hyperparameters to SHAPES.")
    config = Qwen2Config(
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1e6,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **(TINY if tiny else SHAPES[name]),
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model


def _dataset(path: str, n: int, prompt_chars: int, answer_chars: int) -> None:
    from datasets import Dataset

    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789+-"
    rows = [
        {
            "messages": [
                {"role": "user", "content": "".join(rng.choice(alphabet) for _ in range(prompt_chars))},
                {"role": "assistant", "content": "".join(rng.choice(alphabet) for _ in range(answer_chars))},
            ]
        }
        for _ in range(n)
    ]
    Dataset.from_list(rows).to_json(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU, to check the script itself")
    ns = parser.parse_args()

    from trl_tip.toy import make_tokenizer
    from trl_tip.train import parse_args, run

    recipe = yaml.safe_load(open(ns.recipe))
    device = "cpu" if ns.tiny else "cuda"
    tokenizer = make_tokenizer()
    tokenizer.model_max_length = 4096
    with tempfile.TemporaryDirectory() as tmp:
        student, teacher = os.path.join(tmp, "student"), os.path.join(tmp, "teacher")
        _save_random_model(recipe["model_name_or_path"], student, tokenizer, ns.tiny, device)
        _save_random_model(recipe["teacher_model_name_or_path"], teacher, tokenizer, ns.tiny, device)
        data = os.path.join(tmp, "train.jsonl")
        # One character = one token: prompts fill max_length minus the answer, then max_new_tokens are generated.
        distillation = recipe.get("trainer") == "distillation"
        max_length = int(recipe.get("max_length", 1024))  # DistillationConfig has none: prompts of ~1024 tokens
        _dataset(data, 64, max_length - 64 - 8, 64)
        argv = ["--config", ns.recipe, "--model_name_or_path", student, "--teacher_model_name_or_path", teacher]
        argv += ["--dataset_name", data, "--output_dir", os.path.join(tmp, "out"), "--max_steps", str(ns.steps)]
        argv += ["--gradient_accumulation_steps", "1", "--save_strategy", "no", "--logging_steps", "1"]
        if ns.tiny:
            length_flag = "--max_completion_length" if distillation else "--max_new_tokens"
            argv += ["--use_cpu", "true", "--bf16", "false", length_flag, "4", "--dtype", "float32"]
            argv += ["--bnb_4bit_compute_dtype", "float32", "--per_device_train_batch_size", "2"]
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        script_args, training_args, model_args = parse_args(argv)  # the recipe's `trainer` picks the config
        trainer = run(script_args, training_args, model_args)
        logs = [log for log in trainer.state.log_history if "tip/tokens_eligible" in log]
        tokens = logs[-1]["tip/tokens_eligible"] if logs else float("nan")
        if device == "cuda":
            allocated = torch.cuda.max_memory_allocated() / 2**30
            reserved = torch.cuda.max_memory_reserved() / 2**30
            print(
                f"MEMORY {ns.recipe}: peak allocated {allocated:.2f} GiB, peak reserved {reserved:.2f} GiB "
                f"({torch.cuda.get_device_name()}, {ns.steps} steps, batch {training_args.per_device_train_batch_size}, "
                f"{tokens:.0f} completion tokens in the last step)",
                flush=True,
            )
        else:
            print(f"MEMORY {ns.recipe}: CPU smoke run done ({tokens:.0f} completion tokens in the last step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
