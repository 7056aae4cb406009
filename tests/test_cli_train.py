"""`trl-tip train`: every recipe parses, and a recipe runs end to end with tiny local models on CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl_tip.cli import COMMANDS, main  # noqa: E402
from trl_tip.config import TIPConfig  # noqa: E402
from trl_tip.models import TIPModelConfig, get_quantization_config  # noqa: E402
from trl_tip.toy import arithmetic_dataset, make_model, make_tokenizer  # noqa: E402
from trl_tip.train import make_parser  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("qwen*/*.yaml"))
CPU = ["--use_cpu", "true", "--bf16", "false"]


def test_train_is_a_command():
    assert "train" in COMMANDS


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_parses(recipe, tmp_path):
    text = recipe.read_text()
    head = text.split("\n# Models")[0]
    assert "Written for: student" in head and "Memory per GPU" in head
    script_args, training_args, model_args = make_parser().parse_args_and_config(
        ["--config", str(recipe), "--output_dir", str(tmp_path), *CPU]
    )
    assert isinstance(training_args, TIPConfig) and isinstance(model_args, TIPModelConfig)
    assert model_args.model_name_or_path and training_args.teacher_model_name_or_path and script_args.dataset_name
    kind = recipe.stem.split("_")[0]
    assert model_args.use_peft == (kind in ("lora", "qlora"))
    quantization = get_quantization_config(model_args)
    assert (quantization is not None) == (kind == "qlora")
    if kind == "qlora":
        assert quantization.bnb_4bit_quant_type == "nf4" and quantization.bnb_4bit_use_double_quant
    if kind in ("lora", "qlora"):
        assert model_args.lora_target_modules == "all-linear"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = make_tokenizer()
    for name, seed in (("teacher", 1), ("student", 2)):
        make_model(tokenizer, 32, 1, seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    arithmetic_dataset(16).to_json(str(root / "train.jsonl"))
    return root


def test_cli_runs_qlora_recipe_with_local_models(tiny_models, tmp_path):
    """The QLoRA + quadrants(Q3) recipe, pointed at tiny local models and a local jsonl, trains and saves."""
    recipe = ROOT / "recipes" / "qwen2.5-0.5b-from-1.5b" / "qlora_q3.yaml"
    out = tmp_path / "out"
    main(
        [
            "train",
            "--config",
            str(recipe),
            "--model_name_or_path",
            str(tiny_models / "student"),
            "--teacher_model_name_or_path",
            str(tiny_models / "teacher"),
            "--dataset_name",
            str(tiny_models / "train.jsonl"),
            "--output_dir",
            str(out),
            *CPU,
            "--dtype",
            "float32",
            "--teacher_dtype",
            "float32",
            "--bnb_4bit_compute_dtype",
            "float32",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--gradient_accumulation_steps",
            "1",
            "--max_new_tokens",
            "4",
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
            "--lora_r",
            "4",
        ]
    )
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and (out / "adapter_model.safetensors").is_file()
    args = __import__("torch").load(out / "training_args.bin", weights_only=False)
    assert args.token_selection == "quadrants" and args.quadrants == ["Q3"]
    assert args.model_init_kwargs["dtype"] == "float32"  # the recipe's options reached the trainer


def test_cli_missing_teacher_is_an_error(tiny_models, tmp_path):
    argv = ["train", "--model_name_or_path", str(tiny_models / "student"), "--dataset_name", "x.jsonl"]
    with pytest.raises(ValueError, match="teacher_model_name_or_path"):
        main([*argv, "--output_dir", str(tmp_path), *CPU])


def test_quantization_configs_from_model_args():
    import torch

    args = TIPModelConfig(load_in_4bit=True, dtype="bfloat16", use_bnb_nested_quant=True, teacher_load_in_8bit=True)
    student = get_quantization_config(args)
    assert student.load_in_4bit and student.bnb_4bit_quant_type == "nf4" and student.bnb_4bit_use_double_quant
    assert student.bnb_4bit_compute_dtype == torch.bfloat16  # TRL's convention: compute in the model dtype
    assert get_quantization_config(args, teacher=True).load_in_8bit
    args = TIPModelConfig(teacher_load_in_4bit=True, dtype="auto", bnb_4bit_compute_dtype="float16")
    assert get_quantization_config(args) is None
    teacher = get_quantization_config(args, teacher=True)
    assert teacher.load_in_4bit and teacher.bnb_4bit_compute_dtype == torch.float16
    with pytest.raises(ValueError, match="teacher_load_in_4bit and teacher_load_in_8bit"):
        TIPModelConfig(teacher_load_in_4bit=True, teacher_load_in_8bit=True)
    with pytest.raises(ValueError, match="bnb_4bit_compute_dtype"):
        TIPModelConfig(bnb_4bit_compute_dtype="int8")
