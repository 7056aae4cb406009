"""`trl-tip train`: every recipe parses, and a recipe runs end to end with tiny local models on CPU."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from datasets import Dataset


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl_tip.cli import COMMANDS, main  # noqa: E402
from trl_tip.config import TIPConfig, TIPDistillationConfig  # noqa: E402
from trl_tip.models import TIPModelConfig, get_quantization_config  # noqa: E402
from trl_tip.toy import arithmetic_dataset, make_model, make_tokenizer  # noqa: E402
from trl_tip.train import make_parser, parse_args  # noqa: E402


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
    script_args, training_args, model_args = parse_args(["--config", str(recipe), "--output_dir", str(tmp_path), *CPU])
    distillation = recipe.stem.startswith("distillation_")
    assert script_args.trainer == ("distillation" if distillation else "gkd")
    assert isinstance(training_args, TIPDistillationConfig if distillation else TIPConfig)
    assert isinstance(model_args, TIPModelConfig)
    assert model_args.model_name_or_path and training_args.teacher_model_name_or_path and script_args.dataset_name
    kind = recipe.stem.removeprefix("distillation_").split("_")[0]
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
    # Text with spaces: the toy tokenizer must survive save_pretrained / from_pretrained next to a Qwen2 model.
    spaced = [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} + {b}?"},
                {"role": "assistant", "content": f"It is {a + b}."},
            ]
        }
        for a, b in zip(range(10, 26), range(30, 46))
    ]
    Dataset.from_list(spaced).to_json(str(root / "spaced.jsonl"))
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


def test_cli_missing_teacher_is_an_error(tiny_models, tmp_path, capsys):
    argv = ["train", "--model_name_or_path", str(tiny_models / "student"), "--dataset_name", "x.jsonl"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output_dir", str(tmp_path), *CPU])
    assert exit_info.value.code == 2 and "teacher_model_name_or_path" in capsys.readouterr().err
    with pytest.raises(ValueError, match="teacher_model_name_or_path"):
        main([*argv, "--output_dir", str(tmp_path), *CPU, "--debug"])


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


def _local(tiny_models, out, data="spaced.jsonl"):
    return [
        "--model_name_or_path",
        str(tiny_models / "student"),
        "--teacher_model_name_or_path",
        str(tiny_models / "teacher"),
        "--dataset_name",
        str(tiny_models / data),
        "--output_dir",
        str(out),
        *CPU,
        "--dtype",
        "float32",
        "--teacher_dtype",
        "float32",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "1",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
    ]


def _tip_logs(out: Path) -> list[dict]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "tip/kept_frac" in entry]


def test_cli_gkd_run_on_saved_toy_models_is_reportable(tiny_models, tmp_path, capsys):
    """`trl-tip train` on saved toy models and text with spaces trains, writes trainer_state.json and the token dump
    at the top of the run; `trl-tip report RUN` then writes RUN/report with the TIP map (not checkpoint-N/report)."""
    from trl_tip.report import main as report_main

    out = tmp_path / "run"
    argv = ["train", *_local(tiny_models, out), "--max_steps", "3", "--max_new_tokens", "6", "--lmbda", "0.0"]
    argv += ["--save_strategy", "steps", "--save_steps", "2", "--token_selection", "tip"]
    main([*argv, "--dump_tokens_every", "1", "--dump_completions", "2"])
    assert (out / "checkpoint-2").is_dir() and (out / "model.safetensors").is_file()
    assert [entry["step"] for entry in _tip_logs(out)] == [1, 2, 3]  # the final state, past the last checkpoint
    dump = [json.loads(line) for line in (out / "tip_tokens.jsonl").read_text().splitlines()]
    assert sorted({record["step"] for record in dump}) == [1, 2, 3] and len(dump) == 6
    # lmbda=0: the completions are the dataset's, so the dump shows the spaced text as it was written.
    assert all(record["prompt"].startswith("<|user|>What is ") for record in dump)
    assert all("".join(t["token"] for t in record["tokens"]).startswith("It is ") for record in dump)
    capsys.readouterr()
    report_main([str(out)])
    printed = capsys.readouterr().out
    assert f"trl-tip report of {out / 'trainer_state.json'}" in printed and "step 3 (last of 3 logged)" in printed
    assert (out / "report" / "tip_map.png").is_file() and (out / "report" / "tokens.html").is_file()
    assert not (out / "checkpoint-2" / "report").exists()


def test_cli_distillation_recipe_with_local_models(tiny_models, tmp_path):
    """The distillation recipe (`trainer: distillation`) runs TIPDistillationTrainer end to end on a `messages`
    dataset, turned into prompts; LoRA student, tip rule, token dump."""
    import torch

    recipe = ROOT / "recipes" / "qwen2.5-0.5b-from-1.5b" / "distillation_lora_tip.yaml"
    out = tmp_path / "out"
    argv = ["train", "--config", str(recipe), *_local(tiny_models, out), "--max_steps", "2"]
    main([*argv, "--max_completion_length", "4", "--save_strategy", "no", "--lora_r", "4", "--dump_tokens_every", "2"])
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert isinstance(args, TIPDistillationConfig) and args.token_selection == "tip" and args.beta == 0.5
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    logs = _tip_logs(out)
    assert [entry["step"] for entry in logs] == [1, 2]
    assert all(entry["tip/tokens_eligible"] > 0 and entry["tip/kept_frac"] == pytest.approx(0.5) for entry in logs)
    dump = [json.loads(line) for line in (out / "tip_tokens.jsonl").read_text().splitlines()]
    # The prompt is the conversation without its assistant answer; the completion is the student's own.
    assert dump and all(record["prompt"].endswith("?<|end|><|assistant|>") for record in dump)
    assert all("It is" not in record["prompt"] for record in dump)


def test_cli_distillation_flag_on_prompt_dataset(tiny_models, tmp_path):
    """`--trainer distillation` on a plain-text `prompt` dataset, without a recipe."""
    data = tmp_path / "prompts.jsonl"
    Dataset.from_list([{"prompt": f"What is {i} + 1?"} for i in range(8)]).to_json(str(data))
    out = tmp_path / "out"
    argv = ["train", "--trainer", "distillation", *_local(tiny_models, out), "--dataset_name", str(data)]
    main([*argv, "--max_steps", "1", "--max_completion_length", "3", "--save_strategy", "no"])
    assert [entry["step"] for entry in _tip_logs(out)] == [1]


def test_prepare_dataset_shapes():
    from trl_tip.train import prepare_dataset

    user, assistant = {"role": "user", "content": "1 + 1"}, {"role": "assistant", "content": "2"}
    follow_up = {"role": "user", "content": "and 2 + 2?"}
    conversations = Dataset.from_list([{"messages": [user, assistant]}, {"messages": [user, assistant, follow_up]}])
    assert prepare_dataset(conversations, "gkd") is conversations
    prompts = prepare_dataset(conversations, "distillation")
    assert prompts.column_names == ["prompt"]
    assert prompts[0]["prompt"] == [user] and prompts[1]["prompt"] == [user, assistant, follow_up]
    plain = Dataset.from_list([{"prompt": "1 + 1 =", "completion": " 2"}])
    assert prepare_dataset(plain, "distillation") is plain  # TRL reads the prompt and ignores the completion
    assert prepare_dataset(plain, "gkd")[0]["messages"] == [
        {"role": "user", "content": "1 + 1 ="},
        {"role": "assistant", "content": " 2"},
    ]
    chat = Dataset.from_list([{"prompt": [user], "completion": [assistant]}])
    assert prepare_dataset(chat, "gkd")[0]["messages"] == [user, assistant]
    other = Dataset.from_list([{"question": "1 + 1", "answer": "2"}])
    with pytest.raises(ValueError, match=r"has columns \['question', 'answer'\]; `--trainer gkd` needs a `messages`"):
        prepare_dataset(other, "gkd")
    with pytest.raises(ValueError, match=r"`--trainer distillation` needs a `prompt` column"):
        prepare_dataset(other, "distillation")
    with pytest.raises(ValueError, match="no message before its assistant answer"):
        prepare_dataset(Dataset.from_list([{"messages": [assistant]}]), "distillation")


def test_trainer_comes_from_the_flag_or_the_recipe(tmp_path):
    from trl_tip.train import trainer_of

    recipe = ROOT / "recipes" / "qwen2.5-0.5b-from-1.5b" / "distillation_lora_tip.yaml"
    assert trainer_of([]) == "gkd"
    assert trainer_of(["--config", str(recipe)]) == "distillation"
    assert trainer_of(["--config", str(recipe), "--trainer", "gkd"]) == "gkd"
    assert trainer_of(["--trainer=distillation"]) == "distillation"
    with pytest.raises(ValueError, match=r"trainer='grpo' is unknown; use one of gkd, distillation"):
        trainer_of(["--trainer", "grpo"])


def test_train_help_is_short_and_true(capsys):
    from trl_tip.train import short_help

    main(["train", "--help"])
    text = capsys.readouterr().out
    assert text == short_help()
    assert len(text.splitlines()) <= 45 and "--config RECIPE.yaml" in text and "--help-all" in text
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", text)) - {"--config", "--help-all"}
    for trainer in ("gkd", "distillation"):
        known = {s for action in make_parser(trainer)._actions for s in action.option_strings}
        assert options <= known, f"{trainer}: {sorted(options - known)}"
    from trl_tip.selection import TOKEN_SELECTIONS

    rules = text.split("--token_selection RULE")[1].split("--keep_ratio")[0]
    assert sorted(re.findall(r"[a-z][a-z0-9_]*", rules.replace("(default)", ""))) == sorted(TOKEN_SELECTIONS)
    assert "(default)" in rules.split("entropy_sample")[1][:12]  # TIPConfig's default rule


@pytest.mark.parametrize("trainer", ["gkd", "distillation"])
def test_help_defaults_agree_with_the_config_and_the_registry(capsys, trainer):
    """`--help`, `--help-all` and the validation take the default rule and keep_ratio from one source."""
    from trl_tip import TIPConfig, TIPDistillationConfig
    from trl_tip.selection import RULES

    main(["train", "--help"])
    short = " ".join(capsys.readouterr().out.split())
    main(["train", "--help-all", "--trainer", trainer])
    full = " ".join(capsys.readouterr().out.split())
    shown = short.split("--keep_ratio R")[1].split("(default ")[1].split(")")[0]
    assert f"default ({shown})" in full  # --help-all's keep_ratio help: the same text
    # "0.5; 0.1 for q3_score, divergence_topk; 0.6 for sstoken" -> the default of each budgeted rule
    common, *others = shown.split("; ")
    said = {}
    for part in others:
        value, names = part.split(" for ")
        said.update({name: float(value) for name in names.split(", ")})
    config_cls = TIPConfig if trainer == "gkd" else TIPDistillationConfig
    budgeted = [name for name, spec in RULES.items() if spec.budgeted]
    assert set(said) < set(budgeted)
    for name in budgeted:
        # What the validation fills in for each rule is what both help texts say.
        args = config_cls(output_dir="/tmp/unused", token_selection=name, use_cpu=True, bf16=False, report_to="none")
        assert args.keep_ratio == said.get(name, float(common)), name
    default_rule = config_cls(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to="none").token_selection
    assert f"{default_rule} (default)" in short


@pytest.mark.parametrize("trainer", ["gkd", "distillation"])
def test_train_help_all_lists_every_option_and_a_true_teacher_help(capsys, trainer):
    main(["train", "--help-all", "--trainer", trainer])
    text = " ".join(capsys.readouterr().out.split())
    assert "--token_selection" in text and "--dump_tokens_every" in text and "--lora_r" in text
    assert ("--max_new_tokens" in text) == (trainer == "gkd")
    assert ("--max_completion_length" in text) == (trainer == "distillation")
    assert "does not default to the student" in text and "same as the model being trained" not in text


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without GPU")
def test_bf16_recipe_on_cpu_explains_the_fix(tmp_path):
    recipe = ROOT / "recipes" / "qwen2.5-0.5b-from-1.5b" / "lora_tip.yaml"
    with pytest.raises(ValueError, match=r"--use_cpu true --bf16 false --dtype float32 --teacher_dtype float32"):
        parse_args(["--config", str(recipe), "--output_dir", str(tmp_path)])
    _, training_args, _ = parse_args(["--config", str(recipe), "--output_dir", str(tmp_path), *CPU])
    assert training_args.use_cpu and not training_args.bf16


# --------------------------------------------------------------------------- recipes under the other trainer (#24)

GKD_RECIPE = ROOT / "recipes" / "qwen2.5-0.5b-from-1.5b" / "lora_tip.yaml"
DISTILLATION_RECIPE = ROOT / "recipes" / "qwen2.5-0.5b-from-1.5b" / "distillation_lora_tip.yaml"


def _notes(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("trl-tip train: ")]


def test_gkd_recipe_runs_under_the_distillation_trainer(tmp_path, capsys):
    """max_new_tokens becomes max_completion_length, lmbda=1 and max_length are dropped, GKD's sampling temperature
    goes to generation_kwargs (loss at 1, as in GKD), GKD's defaults the recipe relies on are kept; one info line."""
    argv = ["--config", str(GKD_RECIPE), "--trainer", "distillation", "--output_dir", str(tmp_path), *CPU]
    _, args, _ = parse_args(argv)
    assert isinstance(args, TIPDistillationConfig)
    assert (
        args.max_completion_length == 256
        and args.temperature == 1.0
        and args.generation_kwargs == {"temperature": 0.9}
    )
    assert args.beta == 0.5 and args.token_selection == "tip" and args.keep_ratio == 0.5
    assert args.disable_dropout is True and args.shuffle_dataset is False  # GKDConfig's defaults, not Distillation's
    (note,) = _notes(capsys)
    for part in ("max_new_tokens=256 -> max_completion_length=256", "lmbda=1.0 dropped", "max_length=1024 dropped"):
        assert part in note, part
    assert "temperature=0.9 -> generation_kwargs={'temperature': 0.9}" in note
    _, args, _ = parse_args(
        [*argv, "--max_new_tokens", "8", "--temperature", "0.7"]
    )  # flags too; a flag's value is kept
    assert args.max_completion_length == 8 and args.temperature == 0.7 and args.generation_kwargs is None


def test_distillation_recipe_runs_under_the_gkd_trainer(tmp_path, capsys):
    argv = ["--config", str(DISTILLATION_RECIPE), "--trainer", "gkd", "--output_dir", str(tmp_path), *CPU]
    _, args, _ = parse_args(argv)
    assert isinstance(args, TIPConfig)
    assert args.max_new_tokens == 256 and args.lmbda == 1.0 and args.temperature == 1.0 and not args.seq_kd
    assert args.disable_dropout is False and args.shuffle_dataset is True  # DistillationConfig's defaults
    (note,) = _notes(capsys)
    assert "max_completion_length=256 -> max_new_tokens=256" in note and "lmbda=1.0 (always on-policy" in note


@pytest.mark.parametrize(
    ("trainer", "recipe", "extra", "message"),
    [
        ("distillation", GKD_RECIPE, ["--lmbda", "0.5"], r"^lmbda=0.5: GKD's lmbda < 1 .*Use --trainer gkd"),
        ("distillation", GKD_RECIPE, ["--seq_kd", "true"], r"^seq_kd=True: .*Use --trainer gkd"),
        ("distillation", GKD_RECIPE, ["--packing", "true"], r"^packing=True is an option of TIPTrainer .*remove it"),
        ("gkd", DISTILLATION_RECIPE, ["--use_vllm", "true"], r"^use_vllm=True: TIPTrainer \(GKD\) generates with"),
        ("gkd", DISTILLATION_RECIPE, ["--top_p", "0.9"], r"^top_p=0.9 is an option of TIPDistillationTrainer"),
    ],
)
def test_options_that_change_the_training_are_refused_in_one_line(tmp_path, trainer, recipe, extra, message):
    argv = ["--config", str(recipe), "--trainer", trainer, "--output_dir", str(tmp_path), *CPU, *extra]
    with pytest.raises(ValueError, match=message) as error:
        parse_args(argv)
    assert "\n" not in str(error.value)


def test_distillation_sampling_temperature_is_refused_under_gkd(tmp_path):
    """DistillationTrainer takes the loss at its temperature; GKD at 1: a recipe's temperature != 1 is refused
    unless the flag says which temperature to sample at."""
    recipe = tmp_path / "d.yaml"
    recipe.write_text(DISTILLATION_RECIPE.read_text().replace("temperature: 1.0", "temperature: 0.8"))
    argv = ["--config", str(recipe), "--trainer", "gkd", "--output_dir", str(tmp_path), *CPU]
    with pytest.raises(ValueError, match=r"^temperature=0.8: .*Give --temperature 0.8 to sample at 0.8"):
        parse_args(argv)
    assert parse_args([*argv, "--temperature", "0.8"])[1].temperature == 0.8


def test_a_rule_on_the_command_line_drops_the_recipes_rule_options(tmp_path, capsys):
    argv = ["--config", str(GKD_RECIPE), "--output_dir", str(tmp_path), *CPU]
    _, args, _ = parse_args([*argv, "--token_selection", "all"])
    assert args.token_selection == "all" and args.keep_ratio is None
    (note,) = _notes(capsys)
    assert note.endswith(
        "--token_selection all replaces the recipe's tip: dropped the recipe's keep_ratio=0.5 (all does not read it)."
    )
    _, args, _ = parse_args([*argv, "--token_selection", "quadrants", "--quadrants", "Q1", "Q3"])
    assert args.quadrants == ["Q1", "Q3"] and args.keep_ratio is None
    assert "dropped the recipe's keep_ratio=0.5 (quadrants does not read it)" in _notes(capsys)[0]
    _, args, _ = parse_args([*argv, "--token_selection", "q3_score"])  # reads keep_ratio: the recipe's 0.5 stays
    assert args.keep_ratio == 0.5 and not _notes(capsys)
    with pytest.raises(ValueError, match="keep_ratio is not used by token_selection='all'"):
        parse_args([*argv, "--token_selection", "all", "--keep_ratio", "0.3"])  # a flag for a rule that ignores it
    _, args, _ = parse_args([*argv, "--keep_ratio", "none"])  # TRL's spelling of None: the rule's default
    assert args.keep_ratio == 0.5


def test_unknown_options_are_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^unknown option --bogus for trl-tip train --trainer gkd; .*--help-all"):
        parse_args(["--output_dir", str(tmp_path), *CPU, "--bogus", "1"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("bogus_key: 1\noutput_dir: x\n")
    with pytest.raises(ValueError, match=r"r.yaml: bogus_key is not an option of trl-tip train --trainer gkd"):
        parse_args(["--config", str(recipe), *CPU])


# ------------------------------------------------------------------------------------- short user errors (#24)


def _error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_user_errors_are_one_short_message_and_exit_code_2(tmp_path, capsys, monkeypatch):
    """A bf16 recipe on a CPU (the fix used to be line 43 of a 43-line traceback), a missing recipe, a run folder
    without a trainer_state.json, a bad demo option: one line (plus the --debug hint), exit code 2."""
    monkeypatch.delenv("TRL_TIP_DEBUG", raising=False)
    cases = [
        (["train", "--config", str(GKD_RECIPE), "--output_dir", str(tmp_path)], "bf16=True"),
        (["train", "--config", str(tmp_path / "missing.yaml")], "--config"),
        (["report", str(tmp_path / "nowhere")], "does not exist"),
        (["demo", "--keep_ratio", "2", "--output_dir", str(tmp_path / "demo")], "keep_ratio must be in (0, 1]"),
    ]
    if __import__("torch").cuda.is_available():
        cases = cases[1:]
    for argv, what in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        lines = _error_lines(capsys)
        assert exit_info.value.code == 2, argv
        assert len(lines) == 2 and lines[0].startswith(f"trl-tip {argv[0]}: error: ") and what in lines[0], lines
        assert lines[1] == "(--debug or TRL_TIP_DEBUG=1 shows the traceback)"
    assert not (tmp_path / "demo").exists()  # the demo's options are checked before it pretrains anything


def test_debug_flag_or_variable_shows_the_traceback(tmp_path, monkeypatch):
    argv = ["report", str(tmp_path / "nowhere")]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main([*argv, "--debug"])
    monkeypatch.setenv("TRL_TIP_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(argv)


@pytest.mark.slow
def test_the_command_exits_2_without_traceback(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "TRL_TIP_DEBUG": "0", "CUDA_VISIBLE_DEVICES": ""}
    argv = [sys.executable, "-m", "trl_tip", "train", "--config", str(GKD_RECIPE), "--output_dir", str(tmp_path)]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "trl-tip train: error: bf16=True" in result.stderr and "--use_cpu true --bf16 false" in result.stderr
