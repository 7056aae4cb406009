import os
import socket
from pathlib import Path


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from trl_tip.toy import arithmetic_dataset, make_model, make_tokenizer  # noqa: E402


torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def dataset():
    return arithmetic_dataset(32, seed=0)


@pytest.fixture
def student(tokenizer):
    return make_model(tokenizer, hidden_size=32, num_layers=1, seed=2)


@pytest.fixture
def teacher(tokenizer):
    return make_model(tokenizer, hidden_size=48, num_layers=1, seed=1)


# Trainer options every tiny CPU test starts from (both trainers).
TINY_TRAINING = dict(
    use_cpu=True,
    bf16=False,
    seed=0,
    per_device_train_batch_size=4,
    learning_rate=1e-3,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
)


def tiny_args(tmp_path, **overrides):
    """A `TIPConfig` for a few CPU steps of GKD-style on-policy distillation."""
    from trl_tip import TIPConfig

    kwargs = dict(TINY_TRAINING, output_dir=str(tmp_path), max_steps=3, lmbda=1.0, max_new_tokens=6)
    kwargs.update(overrides)
    return TIPConfig(**kwargs)


def tiny_trainer(tmp_path, student, teacher, tokenizer, dataset, callbacks=None, **overrides):
    """A `TIPTrainer` on `tiny_args(tmp_path, **overrides)`."""
    from trl_tip import TIPTrainer

    return TIPTrainer(
        model=student,
        teacher_model=teacher,
        args=tiny_args(tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def dist_args(tmp_path, config_cls=None, **overrides):
    """A `TIPDistillationConfig` (or `config_cls`, e.g. TRL's `DistillationConfig`) for a few CPU steps."""
    from trl_tip import TIPDistillationConfig

    kwargs = dict(
        TINY_TRAINING, output_dir=str(tmp_path), max_steps=2, max_completion_length=6, gradient_checkpointing=False
    )
    kwargs.update(overrides)
    return (config_cls or TIPDistillationConfig)(**kwargs)


def left_tokenizer():
    """The toy tokenizer, left-padded (DistillationTrainer's convention)."""
    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


def prompt_dataset(n=16, seed=0):
    """The toy arithmetic task as DistillationTrainer reads it: a conversational `prompt` column."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": row["messages"][:1]} for row in arithmetic_dataset(n, seed=seed)])


class RecordSelections:
    """An observer of a trl-tip trainer's engine: keeps every `SelectionRecord` (training ones, unless told)."""

    def __init__(self, training_only: bool = True):
        self.training_only = training_only
        self.records = []

    def on_selection(self, record, engine):
        if record.training or not self.training_only:
            self.records.append(record)


def record_selections(trainer, training_only: bool = True) -> RecordSelections:
    """Registers and returns a [`RecordSelections`] observer on `trainer`'s engine."""
    recorder = RecordSelections(training_only)
    trainer.tip_engine.add_observer(recorder)
    return recorder


ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a `torch.distributed.run` launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    """The environment of a spawned check: this checkout importable, one thread per process, TRL's experimental
    warning off."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    env["TRL_EXPERIMENTAL_SILENCE"] = "1"
    return env
