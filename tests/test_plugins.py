"""The plug-in points (`trl_tip.plugins`): signal providers and config arguments, and ssToken built only on them."""

import ast
import dataclasses
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_args

import trl_tip
from trl_tip import TIPTrainer, TokenSelectionEngine
from trl_tip.plugins import PROVIDERS, SignalProvider, plugin_arguments, register_arguments, register_provider
from trl_tip.sstoken import SSTokenArguments
from trl_tip.toy import arithmetic_dataset, make_model, make_tokenizer


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_registry():
    """Registers providers for one test only."""
    before = dict(PROVIDERS)
    yield
    PROVIDERS.clear()
    PROVIDERS.update(before)


def docs_example() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("A minimal provider and a custom selector that reads it", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def trainer_for(tmp_path, selector, **kwargs):
    tokenizer = make_tokenizer()
    return TIPTrainer(
        model=make_model(tokenizer, 32, 1, seed=2),
        teacher_model=make_model(tokenizer, 32, 1, seed=1),
        args=tiny_args(tmp_path, token_selection="all", max_new_tokens=8, **kwargs),
        train_dataset=arithmetic_dataset(16, seed=0),
        processing_class=tokenizer,
        selector=selector,
    )


def test_the_docs_provider_example_trains_on_the_first_tokens(tmp_path, clean_registry):
    namespace = {}
    exec(compile(docs_example(), "docs/architecture.md", "exec"), namespace)
    assert PROVIDERS["completion_offset"] is namespace["PositionProvider"]
    trainer = trainer_for(tmp_path, namespace["FirstTokens"](4), max_steps=1)
    records = []
    trainer.tip_engine.add_observer(type("Recorder", (), {"on_selection": lambda self, r, e: records.append(r)})())
    assert isinstance(trainer.tip_providers["completion_offset"], namespace["PositionProvider"])
    trainer.train()
    (record,) = records
    offsets = record.extras["completion_offset"]
    # Each row's eligible positions are consecutive: the offsets count 0, 1, ... within each row.
    for row in record.signals.seq_idx.unique():
        in_row = record.signals.seq_idx == row
        assert offsets[in_row].tolist() == list(range(int(in_row.sum())))
    assert torch.equal(record.kept, offsets < 4) and 0 < int(record.kept.sum()) < len(offsets)


class CountingProvider(SignalProvider):
    """A stateful provider: counts the micro-batches it saw (and the optimizer steps, from a callback)."""

    provides = ("seen_before",)
    state_name = "counting_provider.pt"

    def __init__(self, trainer, args):
        super().__init__(trainer, args)
        self.count = 0
        self.missing = []

    def before_student(self, batch):
        self.count += 1
        return {"seen_before": torch.full_like(batch.pos_idx, self.count, dtype=torch.float32)}

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]

    def state_missing(self, path):
        self.missing.append(path)


class KeepAll:
    requires = frozenset({"seen_before"})

    def __call__(self, signals, context):
        return torch.isfinite(context.extras["seen_before"])


def test_a_provider_state_is_saved_with_each_checkpoint_and_restored_on_resume(tmp_path, clean_registry):
    register_provider(CountingProvider)
    full = trainer_for(tmp_path / "full", KeepAll(), max_steps=3, save_strategy="steps", save_steps=2)
    full.train()
    provider = full.tip_providers["seen_before"]
    assert provider.count == 3
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert torch.load(checkpoint / "counting_provider.pt")["count"] == 2
    resumed = trainer_for(tmp_path / "resumed", KeepAll(), max_steps=3)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.tip_providers["seen_before"].count == 3 and resumed.tip_providers["seen_before"].missing == []
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    os.remove(broken / "counting_provider.pt")
    other = trainer_for(tmp_path / "other", KeepAll(), max_steps=3)
    other.train(resume_from_checkpoint=str(broken))
    assert other.tip_providers["seen_before"].missing == [str(broken / "counting_provider.pt")]
    assert other.tip_providers["seen_before"].count == 1  # started fresh, saw step 2 only


def test_register_provider_refuses_a_taken_name_and_an_empty_provider(clean_registry):
    class Other(SignalProvider):
        provides = ("history_nll",)

    with pytest.raises(ValueError, match="'history_nll' is provided by HistoryProvider already"):
        register_provider(Other)
    with pytest.raises(ValueError, match="provides is empty"):
        register_provider(type("Empty", (SignalProvider,), {}))


def test_the_engine_checks_requirements_against_the_providers(tmp_path):
    class Needs:
        def __init__(self, *names):
            self.requires = frozenset(names)

        def __call__(self, signals, context):
            return signals.finite

    args = tiny_args(tmp_path, token_selection="all")
    with pytest.raises(
        ValueError, match=r"unknown extra signals \['teacher_attention'\]; allowed values: .*history_nll"
    ):
        TokenSelectionEngine(Needs("teacher_attention"), args, beta=0.5, seed=0)
    engine = TokenSelectionEngine(Needs("history_nll"), args, beta=0.5, seed=0)  # every provider, by default
    engine.provided_signals = frozenset({"prompt_attention"})  # what a trainer without a history model can compute
    engine.set_selector(Needs("prompt_attention"))
    with pytest.raises(ValueError, match="cannot compute .*history model is built at construction only"):
        engine.set_selector(Needs("history_divergence"))


def test_register_arguments_checks_its_dataclass():
    @dataclasses.dataclass
    class NoHelp:
        my_option: int = 1

    with pytest.raises(TypeError, match="needs a dataclass"):
        register_arguments(int)
    with pytest.raises(ValueError, match=r"without metadata=\{'help': ...\}: \['my_option'\]"):
        register_arguments(NoHelp)

    @dataclasses.dataclass
    class Late:
        late_option: int = dataclasses.field(default=1, metadata={"help": "too late"})

    with pytest.raises(RuntimeError, match="after trl_tip.config was imported"):
        register_arguments(Late)
    assert plugin_arguments() == (SSTokenArguments,)
    assert issubclass(trl_tip.TIPConfig, SSTokenArguments) and issubclass(
        trl_tip.TIPDistillationConfig, SSTokenArguments
    )


def test_no_module_outside_sstoken_names_it_in_code():
    """Identifiers, attributes and imports (not docstrings or help text); only the package's `__init__` imports it."""
    offenders = []
    for path in sorted((ROOT / "trl_tip").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith("trl_tip/sstoken/") or relative == "trl_tip/__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(alias.name for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.arg, ast.keyword)):
                names = [getattr(node, "name", None) or getattr(node, "arg", None) or ""]
            offenders += [f"{relative}:{node.lineno}: {n}" for n in names if "sstoken" in n.lower()]
    assert offenders == []
