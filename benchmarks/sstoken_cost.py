"""Cost of ssToken selection inside TIPTrainer: time and peak memory of one `compute_loss` + backward, and of the
EMA update, against the TIP rule, on random-weight Qwen2-shaped models (no download).

Usage (GPU): python benchmarks/sstoken_cost.py --size 0.5b --batch 8 --prompt 256 --completion 1024
Prints one Markdown table row per variant.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


SIZES = {
    # hidden, layers, heads, kv heads, intermediate
    "tiny": (64, 2, 4, 2, 128),
    "small": (256, 4, 8, 2, 1024),
    "medium": (512, 8, 8, 2, 2048),
    "0.5b": (896, 24, 14, 2, 4864),
    "1.5b": (1536, 28, 12, 2, 8960),
}


def build(size: str, vocab: int, dtype: torch.dtype, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv, inter = SIZES[size]
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config).to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="0.5b", choices=SIZES)
    parser.add_argument("--teacher_size", default="1.5b", choices=SIZES)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--completion", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--variants", default="tip,sstoken_attn,sstoken_rel,sstoken,sstoken_cpu,sstoken_nll,lora_sstoken"
    )
    ns = parser.parse_args()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

    from trl_tip import TIPConfig, TIPTrainer
    from trl_tip.sstoken import history_model
    from trl_tip.toy import arithmetic_dataset, make_tokenizer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = make_tokenizer()
    dataset = arithmetic_dataset(16)
    teacher = build(ns.teacher_size, ns.vocab, dtype, seed=1).to(device).eval()
    seq = ns.prompt + ns.completion
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, ns.vocab, (ns.batch, seq), generator=gen).to(device)
    labels = input_ids.clone()
    labels[:, : ns.prompt] = -100
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}

    variants = {
        "tip": dict(token_selection="tip"),
        "sstoken_attn": dict(token_selection="sstoken", sstoken_gamma=0.0),
        "sstoken_rel": dict(token_selection="sstoken", sstoken_gamma=1.0),
        "sstoken": dict(token_selection="sstoken"),
        "sstoken_cpu": dict(token_selection="sstoken", sstoken_history_device="cpu"),
        "sstoken_nll": dict(token_selection="sstoken", sstoken_loss="nll"),
        "lora_sstoken": dict(token_selection="sstoken"),
    }
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; student {ns.size}, teacher {ns.teacher_size}, ")
    print(f"batch {ns.batch} x (prompt {ns.prompt} + completion {ns.completion}), vocab {ns.vocab}, {dtype}")
    print("| variant | step ms (median) | peak GiB | history MiB | EMA update ms |")
    print("|---|---|---|---|---|")
    for name in ns.variants.split(","):
        options = variants[name]
        student = build(ns.size, ns.vocab, dtype, seed=2).to(device)
        peft_config = None
        if name.startswith("lora"):
            from peft import LoraConfig

            peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
        with tempfile.TemporaryDirectory() as out:
            args = TIPConfig(
                output_dir=out,
                use_cpu=not cuda,
                bf16=cuda,
                report_to="none",
                per_device_train_batch_size=ns.batch,
                max_new_tokens=4,
                **options,
            )
            trainer = TIPTrainer(
                model=student,
                teacher_model=teacher,
                args=args,
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=peft_config,
            )
        model = trainer.model
        model.train()
        times, peaks = [], []
        for i in range(ns.repeats + 1):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            loss = trainer.compute_loss(model, inputs)
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            if i > 0:  # the first call warms up kernels and allocator
                times.append(elapsed * 1e3)
                if cuda:
                    peaks.append((torch.cuda.max_memory_allocated() - base) / 2**30)
        history = history_model(trainer)
        ema_ms = float("nan")
        if history is not None:
            ema = []
            for _ in range(3):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                history.update(model)
                if cuda:
                    torch.cuda.synchronize()
                ema.append((time.perf_counter() - start) * 1e3)
            ema_ms = statistics.median(ema)
        history_mib = history.nbytes / 2**20 if history is not None else 0.0
        peak = max(peaks) if peaks else float("nan")
        print(f"| {name} | {statistics.median(times):.1f} | {peak:.2f} | {history_mib:.1f} | {ema_ms:.1f} |")
        del trainer, model, student, history
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
