"""`trl-tip train`: distil a teacher into a student with token selection, from a YAML recipe and/or flags.

In TRL's script style (`trl/scripts/sft.py`, `distillation.py`): `TrlParser` over [`TrainScriptArguments`] (TRL's
`ScriptArguments` for the dataset, plus `trainer` and the token dump), the trainer's config and [`TIPModelConfig`]
(student model, LoRA, 4-bit / 8-bit student and teacher). Every field can come from the recipe (`--config
recipe.yaml`) and be overridden by a flag. `--trainer` (or `trainer:` in the recipe) picks the trainer:

- `gkd` (default): [`TIPTrainer`] over TRL's `GKDTrainer` with a [`TIPConfig`]; rows with a `messages` column (a
  `prompt` + `completion` dataset is turned into conversations);
- `distillation`: [`TIPDistillationTrainer`] over TRL's `DistillationTrainer` with a [`TIPDistillationConfig`]; rows
  with a `prompt` column, conversational or plain (a `messages` dataset is turned into prompts: each conversation
  without its final assistant answer, which the student generates on-policy).

```bash
trl-tip train --config recipes/qwen2.5-0.5b-from-1.5b/lora_tip.yaml
trl-tip train --config recipes/qwen2.5-0.5b-from-1.5b/distillation_lora_tip.yaml
accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m trl_tip train --config recipes/...yaml
trl-tip train --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --teacher_model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \\
    --dataset_name data/train.jsonl --token_selection tip --keep_ratio 0.5 --use_peft --lora_target_modules all-linear \\
    --dump_tokens_every 50 --output_dir runs/tip
```

The dataset is loaded with `datasets.load_dataset`: a hub id (with `dataset_config`), a local directory, or a local
`.json`/`.jsonl`/`.csv`/`.parquet` file (its rows become the `train` split). At the end the model is saved to
`output_dir` with `trainer_state.json` (the logs), so `trl-tip report OUTPUT_DIR` draws the run's Q1–Q4 picture;
`--dump_tokens_every N` adds the per-token dump for its TIP map and token page.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

from trl import ScriptArguments


__all__ = [
    "TRAINERS",
    "TrainScriptArguments",
    "load_training_dataset",
    "main",
    "make_parser",
    "parse_args",
    "prepare_dataset",
    "run",
    "short_help",
]

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TRAINERS = ("gkd", "distillation")
TEACHER_HELP = (
    "The teacher: a hub id or a local directory (required: trl-tip does not default to the student, which would "
    "distil a model into itself). It must share the student's vocabulary."
)


@dataclass
class TrainScriptArguments(ScriptArguments):
    r"""
    TRL's `ScriptArguments` (the dataset) plus the options of `trl-tip train` itself.

    Args:
        trainer (`str`, *optional*, defaults to `"gkd"`):
            `"gkd"`: [`TIPTrainer`] (TRL's `GKDTrainer`, a `messages` dataset); `"distillation"`:
            [`TIPDistillationTrainer`] (TRL's `DistillationTrainer`, a `prompt` dataset).
        dump_tokens_every (`int`, *optional*):
            Add a [`TokenDumpCallback`]: every that many steps, the per-token signals of a few completions go to
            `output_dir/tip_tokens.jsonl` (read by `trl-tip report` for the TIP map and the token page).
        dump_completions (`int`, *optional*, defaults to `4`):
            Completions per token dump.
    """

    trainer: str = field(
        default="gkd",
        metadata={
            "help": "`gkd`: TIPTrainer over TRL's GKDTrainer (a `messages` dataset); `distillation`: "
            "TIPDistillationTrainer over TRL's DistillationTrainer (a `prompt` dataset).",
            "choices": list(TRAINERS),
        },
    )
    dump_tokens_every: int | None = field(
        default=None,
        metadata={
            "help": "Write the per-token signals of a few completions to OUTPUT_DIR/tip_tokens.jsonl every N steps "
            "(for the TIP map and token page of `trl-tip report`)."
        },
    )
    dump_completions: int = field(default=4, metadata={"help": "Completions per token dump."})

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):
            super().__post_init__()
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer={self.trainer!r} is unknown; use one of {', '.join(TRAINERS)}.")
        if self.dump_tokens_every is not None and self.dump_tokens_every < 1:
            raise ValueError(f"dump_tokens_every must be >= 1 (or unset), got {self.dump_tokens_every}.")
        if self.dump_completions < 1:
            raise ValueError(f"dump_completions must be >= 1, got {self.dump_completions}.")


# The short `--help`: the options a first run needs. Each `--option` named here is an option of both trainers'
# parsers (tests/test_cli_train.py checks it), so the text stays true.
SHORT_HELP = """\
usage: trl-tip train [--config RECIPE.yaml] [--trainer {gkd,distillation}] [OPTIONS]

Distil a teacher into a student with token selection, in TRL's script style: every option can come from a YAML
recipe (--config) and be overridden by a flag. The recipes under recipes/ are ready-made configurations.

main options:
  --config RECIPE.yaml          a YAML recipe, e.g. recipes/qwen2.5-0.5b-from-1.5b/lora_tip.yaml
  --trainer {gkd,distillation}  gkd (default): TIPTrainer over TRL's GKDTrainer, rows with a `messages` column;
                                distillation: TIPDistillationTrainer over TRL's DistillationTrainer, rows with a
                                `prompt` column (either trainer converts the other shape)
  --model_name_or_path PATH     the student: a hub id or a local directory
  --teacher_model_name_or_path PATH
                                the teacher (required): a hub id or a local directory, same vocabulary
  --dataset_name NAME           a hub id, a local directory or a .json/.jsonl/.csv/.parquet file
  --output_dir DIR              checkpoints, logs (trainer_state.json) and the trained model
  --token_selection RULE        {rules}
  --keep_ratio R                share of the tokens kept by a budgeted rule, in (0, 1]
                                (default {keep_ratio_defaults})
  --use_peft true               train a LoRA adapter (--lora_r, --lora_target_modules all-linear, ...)
  --load_in_4bit true           4-bit (QLoRA) student, with --use_peft true
  --max_steps N                 optimizer steps (or --num_train_epochs N); --learning_rate LR,
                                --per_device_train_batch_size N, --gradient_accumulation_steps N
  --dump_tokens_every N         per-token dump every N steps, for `trl-tip report OUTPUT_DIR`
  --use_cpu true                train on the CPU; the recipes set bf16: true and dtype: bfloat16 for a GPU, so
                                on a CPU add --use_cpu true --bf16 false --dtype float32 --teacher_dtype float32

all options (TRL's trainer config, token selection, model, LoRA and quantization):
  trl-tip train --help-all                          (for --trainer gkd)
  trl-tip train --help-all --trainer distillation
"""


def short_help() -> str:
    """The text of `trl-tip train --help`: the rule list, the default rule and the `keep_ratio` defaults read from
    the registry and the config (the sources `--help-all` and the validation use), so it is never stale."""
    import dataclasses
    import textwrap

    from .config import TIPArguments
    from .selection import TOKEN_SELECTIONS
    from .selection.registry import keep_ratio_defaults

    default = next(f.default for f in dataclasses.fields(TIPArguments) if f.name == "token_selection")
    names = [f"{name} (default)" if name == default else name for name in TOKEN_SELECTIONS]
    lines = textwrap.wrap(", ".join(names), width=85)
    text = SHORT_HELP.replace("{rules}", ("\n" + " " * 32).join(lines))
    return text.replace("{keep_ratio_defaults}", keep_ratio_defaults())


USAGE = "trl-tip train [--config RECIPE.yaml] [--trainer {gkd,distillation}] [OPTIONS]  (--help, --help-all)"


def make_parser(trainer: str = "gkd", prog: str = "trl-tip train"):
    """The `TrlParser` of `(TrainScriptArguments, TIPConfig or TIPDistillationConfig, TIPModelConfig)`.

    Args:
        trainer (`str`, *optional*, defaults to `"gkd"`): `"gkd"` ([`TIPConfig`]) or `"distillation"`
            ([`TIPDistillationConfig`]).
    """
    from trl import TrlParser

    from ._compat import argparse_actions
    from .config import TIPConfig, TIPDistillationConfig
    from .models import TIPModelConfig

    if trainer not in TRAINERS:
        raise ValueError(f"trainer={trainer!r} is unknown; use one of {', '.join(TRAINERS)}.")
    config_class = TIPConfig if trainer == "gkd" else TIPDistillationConfig
    parser = TrlParser((TrainScriptArguments, config_class, TIPModelConfig), prog=prog, usage=USAGE)
    for action in argparse_actions(parser):
        if action.dest == "teacher_model_name_or_path":
            action.help = TEACHER_HELP  # TRL's text says the teacher defaults to the student; trl-tip refuses that
    return parser


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def trainer_of(argv: list[str]) -> str:
    """The trainer a command line asks for: `--trainer`, else the recipe's `trainer:` key, else `"gkd"`."""
    trainer = _flag_value(argv, "--trainer")
    config = _flag_value(argv, "--config")
    if trainer is None and config is not None and os.path.isfile(config):
        import yaml

        with open(config, encoding="utf-8") as f:
            try:
                recipe = yaml.safe_load(f)
            except yaml.YAMLError:
                recipe = None  # reported by the recipe reader
        if isinstance(recipe, dict) and recipe.get("trainer") is not None:
            trainer = str(recipe["trainer"])
    trainer = trainer or "gkd"
    if trainer not in TRAINERS:
        raise ValueError(f"trainer={trainer!r} is unknown; use one of {', '.join(TRAINERS)} (--trainer).")
    return trainer


def _explain_bf16(error: ValueError) -> ValueError | None:
    """A clearer error for `bf16=True` on a machine without bf16 support (the recipes set `bf16: true`)."""
    if "bf16" not in str(error):
        return None
    return ValueError(
        "bf16=True (the recipes under recipes/ set `bf16: true` and `dtype: bfloat16`, for a GPU) needs a GPU, and "
        "none is visible. To train on this CPU in float32, add --use_cpu true --bf16 false --dtype float32 "
        "--teacher_dtype float32; on a GPU machine, check that torch.cuda.is_available()."
    )


def parse_args(argv: list[str] | None = None) -> tuple[Any, Any, Any]:
    """Parses a `trl-tip train` command line (and its recipe) into `(script_args, training_args, model_args)`.

    Before TRL's parser, the recipe and the flags are translated for the chosen trainer and a rule given on the
    command line drops the recipe's options it does not read (`trl_tip.recipe`); the info lines go to stderr.

    Raises:
        ValueError: for an invalid option (one line naming the option and the fix).
    """
    from .recipe import print_notes, read_command_line, translate

    argv = list(sys.argv[1:] if argv is None else argv)
    trainer = trainer_of(argv)
    parser = make_parser(trainer)
    other_parser = make_parser("distillation" if trainer == "gkd" else "gkd")
    line = translate(read_command_line(argv, parser, other_parser), trainer, parser, other_parser)
    print_notes(line.notes)
    if line.recipe is not None:
        unknown = sorted(set(line.recipe) - {a.dest for a in _actions(parser)})
        if unknown:
            raise ValueError(
                f"--config {line.recipe_path}: {', '.join(unknown)} {'is not an option' if len(unknown) == 1 else 'are not options'} "
                f"of trl-tip train --trainer {trainer}; `trl-tip train --help-all --trainer {trainer}` lists them."
            )
        parser.set_defaults_with_config(**line.recipe)
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=line.argv(), return_remaining_strings=True)
    except ValueError as error:
        explained = _explain_bf16(error)
        if explained is None:
            raise
        raise explained from error
    if remaining:
        options = [r for r in remaining if r.startswith("-")] or remaining
        raise ValueError(
            f"unknown option{'s' if len(options) > 1 else ''} {' '.join(options)} for trl-tip train --trainer "
            f"{trainer}; `trl-tip train --help-all --trainer {trainer}` lists every option."
        )
    return tuple(parsed)


def _actions(parser) -> list:
    from ._compat import argparse_actions

    return argparse_actions(parser)


def load_training_dataset(script_args) -> Any:
    """`datasets.load_dataset` of `script_args.dataset_name`: a local data file, a local directory, or a hub id.

    Returns:
        `datasets.DatasetDict`
    """
    from datasets import load_dataset

    name = script_args.dataset_name
    if name is None:
        raise ValueError("Set the dataset: dataset_name (a hub id, a local directory, or a .json/.jsonl/.csv file).")
    extension = os.path.splitext(name)[1].lower()
    if os.path.isfile(name):
        if extension not in LOCAL_FORMATS:
            raise ValueError(
                f"dataset_name={name!r} is a file of an unsupported type; use one of {', '.join(LOCAL_FORMATS)}."
            )
        return load_dataset(LOCAL_FORMATS[extension], data_files={script_args.dataset_train_split: name})
    return load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)


def _as_messages(prompt: Any, role: str) -> list[dict[str, Any]]:
    return list(prompt) if isinstance(prompt, list) else [{"role": role, "content": prompt}]


def _prompt_completion_to_messages(row: dict[str, Any]) -> dict[str, Any]:
    return {"messages": _as_messages(row["prompt"], "user") + _as_messages(row["completion"], "assistant")}


def _messages_to_prompt(row: dict[str, Any]) -> dict[str, Any]:
    messages = list(row["messages"])
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]  # the answer the student generates on-policy
    if not messages:
        raise ValueError(
            f"A conversation has no message before its assistant answer, so it gives no prompt: {row['messages']!r}. "
            "Drop such rows, e.g. dataset.filter(lambda x: len(x['messages']) > 1)."
        )
    return {"prompt": messages}


def prepare_dataset(dataset: Any, trainer: str, name: str = "dataset") -> Any:
    """Puts a dataset into the shape the trainer reads, or raises a clear error.

    - `gkd` reads a `messages` column (or pre-tokenized `input_ids`); a `prompt` + `completion` dataset
      (conversational or plain text) becomes `messages` = prompt + completion.
    - `distillation` reads a `prompt` column (conversational or plain text); a `messages` dataset becomes `prompt` =
      each conversation without its final assistant answer (the student generates it).

    Datasets whose columns are unknown (a streaming dataset without features) are returned unchanged.
    """
    columns = getattr(dataset, "column_names", None)
    if not isinstance(columns, (list, tuple)):
        return dataset
    shapes = (
        "a `messages` column (conversations: lists of {'role': ..., 'content': ...} ending with the assistant's "
        "answer) or `prompt` and `completion` columns"
        if trainer == "gkd"
        else "a `prompt` column (a conversation or a text) or a `messages` column (conversations)"
    )
    if trainer == "gkd":
        if "messages" in columns or "input_ids" in columns:
            return dataset
        if "prompt" in columns and "completion" in columns:
            return dataset.map(_prompt_completion_to_messages, remove_columns=["prompt", "completion"])
    else:
        if "prompt" in columns:
            return dataset
        if "messages" in columns:
            return dataset.map(_messages_to_prompt, remove_columns=["messages"])
    raise ValueError(f"{name} has columns {list(columns)}; `--trainer {trainer}` needs {shapes}.")


def _check_rows(dataset: Any, name: str) -> None:
    try:
        size = len(dataset)
    except TypeError:
        return
    if size == 0:
        raise ValueError(f"{name} is empty (0 rows).")


def run(script_args, training_args, model_args):
    """Builds student, teacher, tokenizer and dataset from the parsed arguments, trains and saves.

    Returns:
        [`TIPTrainer`] or [`TIPDistillationTrainer`]: The trainer after training (the model and `trainer_state.json`
        are saved in `training_args.output_dir`).
    """
    from transformers import AutoTokenizer
    from trl import get_peft_config

    from .config import TIPDistillationConfig
    from .models import get_quantization_config, kbit_device_map
    from .token_dump import TokenDumpCallback
    from .trainers import TIPDistillationTrainer, TIPTrainer

    trainer_kind = getattr(script_args, "trainer", "gkd")
    if (trainer_kind == "distillation") != isinstance(training_args, TIPDistillationConfig):
        raise ValueError(
            f"trainer={trainer_kind!r} does not match the config {type(training_args).__name__}; parse the command "
            "line with trl_tip.train.parse_args."
        )
    if model_args.model_name_or_path is None:
        raise ValueError("Set the student: model_name_or_path (a hub id or a local directory).")
    if training_args.teacher_model_name_or_path is None:
        raise ValueError("Set the teacher: teacher_model_name_or_path (a hub id or a local directory).")

    # The student's quantization travels as the trainer's quantization_config argument, not in the init kwargs.
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    teacher_init_kwargs = {
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.teacher_dtype or model_args.dtype,
    }
    teacher_quantization = get_quantization_config(model_args, teacher=True)
    if trainer_kind == "distillation":
        # DistillationTrainer loads the teacher from its init kwargs alone (TRL's script does the same).
        if training_args.teacher_model_revision is not None:
            teacher_init_kwargs["revision"] = training_args.teacher_model_revision
        if teacher_quantization is not None:
            teacher_init_kwargs["quantization_config"] = teacher_quantization
            teacher_init_kwargs["device_map"] = kbit_device_map()
    teacher_init_kwargs.update(training_args.teacher_model_init_kwargs or {})
    training_args.teacher_model_init_kwargs = teacher_init_kwargs

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        # DistillationTrainer pads prompts on the left for generation (it loads its own tokenizer that way).
        **({"padding_side": "left"} if trainer_kind == "distillation" else {}),
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    dataset = load_training_dataset(script_args)
    if script_args.dataset_train_split not in dataset:
        raise ValueError(
            f"dataset_train_split={script_args.dataset_train_split!r} is not a split of {script_args.dataset_name!r} "
            f"(splits: {', '.join(dataset)})."
        )
    train_dataset = dataset[script_args.dataset_train_split]
    _check_rows(train_dataset, f"The train split {script_args.dataset_train_split!r}")
    train_dataset = prepare_dataset(train_dataset, trainer_kind, "The train split")
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if script_args.dataset_test_split not in dataset:
            raise ValueError(
                f"eval_strategy={training_args.eval_strategy!r} needs the split dataset_test_split="
                f"{script_args.dataset_test_split!r}, which {script_args.dataset_name!r} lacks."
            )
        eval_dataset = dataset[script_args.dataset_test_split]
        _check_rows(eval_dataset, f"The test split {script_args.dataset_test_split!r}")
        eval_dataset = prepare_dataset(eval_dataset, trainer_kind, "The test split")

    callbacks = []
    if getattr(script_args, "dump_tokens_every", None):
        callbacks.append(TokenDumpCallback(script_args.dump_tokens_every, script_args.dump_completions))
    common = dict(
        model=model_args.model_name_or_path,
        teacher_model=training_args.teacher_model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks or None,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    if trainer_kind == "gkd":
        trainer = TIPTrainer(**common, teacher_quantization_config=teacher_quantization)
    else:
        trainer = TIPDistillationTrainer(**common)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json next to the model: the logs `trl-tip report` reads
    trainer.accelerator.print(
        f"trl-tip train: model and trainer_state.json saved to {training_args.output_dir}; "
        f"`trl-tip report {training_args.output_dir}` draws its Q1-Q4 picture."
    )
    return trainer


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help-all" in argv:
        make_parser(trainer_of(argv)).print_help()
        return
    if "-h" in argv or "--help" in argv:
        print(short_help(), end="")
        return
    from .cli import quiet_third_party_noise

    quiet_third_party_noise()
    script_args, training_args, model_args = parse_args(argv)
    run(script_args, training_args, model_args)


if __name__ == "__main__":
    import sys

    from trl_tip.cli import main as cli_main

    cli_main(["train", *sys.argv[1:]])
