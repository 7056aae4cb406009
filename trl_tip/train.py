"""`trl-tip train`: distil a teacher into a student with `TIPTrainer` from a YAML recipe and/or command-line flags.

In TRL's script style (`trl/scripts/sft.py`, `distillation.py`): `TrlParser` over `ScriptArguments` (dataset),
[`TIPConfig`] (training, token selection, `teacher_model_name_or_path`) and [`TIPModelConfig`] (student model,
LoRA, 4-bit / 8-bit student and teacher). Every field can come from the recipe (`--config recipe.yaml`) and be
overridden by a flag.

```bash
trl-tip train --config recipes/qwen2.5/lora_tip.yaml
accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m trl_tip train --config recipes/...yaml
trl-tip train --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --teacher_model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \\
    --dataset_name data/train.jsonl --token_selection tip --keep_ratio 0.5 --use_peft --lora_target_modules all-linear \\
    --output_dir runs/tip
```

The dataset is loaded with `datasets.load_dataset`: a hub id (with `dataset_config`), a local directory, or a local
`.json`/`.jsonl`/`.csv`/`.parquet` file (its rows become the `train` split). Rows need a `messages` column
(conversations), as for `GKDTrainer`.
"""

from __future__ import annotations

import os
from typing import Any


__all__ = ["load_training_dataset", "main", "make_parser", "run"]

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def make_parser(prog: str = "trl-tip train"):
    """The `TrlParser` of `(ScriptArguments, TIPConfig, TIPModelConfig)`."""
    from trl import ScriptArguments, TrlParser

    from .config import TIPConfig
    from .models import TIPModelConfig

    return TrlParser((ScriptArguments, TIPConfig, TIPModelConfig), prog=prog)


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


def run(script_args, training_args, model_args):
    """Builds student, teacher, tokenizer and dataset from the parsed arguments, trains and saves.

    Returns:
        [`TIPTrainer`]: The trainer after training (the model is saved in `training_args.output_dir`).
    """
    from transformers import AutoTokenizer
    from trl import get_peft_config

    from .models import get_quantization_config
    from .trainers import TIPTrainer

    if model_args.model_name_or_path is None:
        raise ValueError("Set the student: model_name_or_path (a hub id or a local directory).")
    if training_args.teacher_model_name_or_path is None:
        raise ValueError("Set the teacher: teacher_model_name_or_path (a hub id or a local directory).")

    # The quantization travels as the trainer's quantization_config arguments, not in the init kwargs.
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
    teacher_init_kwargs.update(training_args.teacher_model_init_kwargs or {})
    training_args.teacher_model_init_kwargs = teacher_init_kwargs

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    dataset = load_training_dataset(script_args)
    if script_args.dataset_train_split not in dataset:
        raise ValueError(
            f"dataset_train_split={script_args.dataset_train_split!r} is not a split of {script_args.dataset_name!r} "
            f"(splits: {', '.join(dataset)})."
        )
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if script_args.dataset_test_split not in dataset:
            raise ValueError(
                f"eval_strategy={training_args.eval_strategy!r} needs the split dataset_test_split="
                f"{script_args.dataset_test_split!r}, which {script_args.dataset_name!r} lacks."
            )
        eval_dataset = dataset[script_args.dataset_test_split]

    trainer = TIPTrainer(
        model=model_args.model_name_or_path,
        teacher_model=training_args.teacher_model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
        teacher_quantization_config=get_quantization_config(model_args, teacher=True),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"trl-tip train: model saved to {training_args.output_dir}")
    return trainer


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    parser = make_parser()
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    run(script_args, training_args, model_args)


if __name__ == "__main__":
    main()
