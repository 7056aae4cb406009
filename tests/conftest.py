import os


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


def tiny_args(tmp_path, **overrides):
    from trl_tip import TIPConfig

    kwargs = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        seed=0,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lmbda=1.0,
        max_new_tokens=6,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TIPConfig(**kwargs)


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
