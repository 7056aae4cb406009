"""What the commands and the library print: no third-party noise that trl-tip's own imports and calls cause, and
every warning that concerns the user's code still shown."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_args

from trl_tip import TIPTrainer
from trl_tip._compat import GKDConfig, GKDTrainer
from trl_tip._quiet import BNB_CPU_LOGGER
from trl_tip.trainers.gkd import GKD_MIGRATION_HINT


ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m trl_tip ARGS` in a fresh process, as a user runs it (no TRL_EXPERIMENTAL_SILENCE)."""
    env = {k: v for k, v in os.environ.items() if k != "TRL_EXPERIMENTAL_SILENCE"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "trl_tip", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )


@pytest.mark.slow
def test_train_help_prints_only_the_help():
    """Importing trl-tip (here for `trl-tip train --help`) printed TRL's experimental warning first."""
    result = _run("train", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("usage: trl-tip train [--config RECIPE.yaml]")


@pytest.mark.slow
def test_demo_prints_progress_and_the_table_only(tmp_path):
    result = _run(
        "demo", "--max_steps", "2", "--teacher_steps", "2", "--student_steps", "1", "--output_dir", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    assert "quadrant" in result.stdout and "Q3 low H, high D" in result.stdout
    assert "{'loss'" not in result.stdout and "'tip/q1/frac'" not in result.stdout  # no log dicts without --verbose
    assert "pretraining the teacher" in result.stderr and "100%" in result.stderr  # progress bars
    for noise in ("Warning", "warn", "[transformers]", "DistillationTrainer", "Writing model shards"):
        assert noise not in result.stderr, noise


def test_demo_verbose_prints_the_log_dicts(tmp_path, capsys):
    from trl_tip.demo import main

    main(
        [
            "--max_steps",
            "1",
            "--teacher_steps",
            "1",
            "--student_steps",
            "0",
            "--output_dir",
            str(tmp_path),
            "--verbose",
        ]
    )
    out = capsys.readouterr().out
    assert "'tip/q1/frac'" in out and "Q3 low H, high D" in out


def _gkd_hints(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if GKD_MIGRATION_HINT in r.getMessage()]


def test_gkd_migration_hint_is_dropped_for_tip_trainer_only(tmp_path, student, teacher, tokenizer, dataset, caplog):
    """GKDTrainer suggests migrating to TRL's DistillationTrainer at lmbda=1, temperature=1; for a TIPTrainer the
    counterpart is TIPDistillationTrainer (logged at info level), and a plain GKDTrainer keeps TRL's hint."""
    options = dict(lmbda=1.0, temperature=1.0, max_steps=1, use_cpu=True, bf16=False, report_to="none")
    with caplog.at_level(logging.INFO):
        TIPTrainer(
            model=student,
            teacher_model=teacher,
            args=tiny_args(tmp_path / "tip", **options),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    assert _gkd_hints(caplog) == []
    assert any("also covered by TIPDistillationTrainer" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=GKDConfig(output_dir=str(tmp_path / "gkd"), **options),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    assert len(_gkd_hints(caplog)) == 1


def test_bitsandbytes_missing_kernels_notice_is_dropped_and_other_failures_kept(caplog):
    """bitsandbytes' CPU backend logs at import, on CPUs with AVX512-BF16, that the optional `kernels` package is
    missing (it then uses its own kernel): dropped. Any other failure to load the kernel is still logged."""
    bnb_logger = logging.getLogger(BNB_CPU_LOGGER)
    message = (
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip install "
        "kernels` and the kernels >= 0.11.1"
    )
    with caplog.at_level(logging.WARNING, logger=BNB_CPU_LOGGER):
        bnb_logger.warning(message, ModuleNotFoundError("No module named 'kernels'", name="kernels"))
        assert caplog.records == []
        bnb_logger.warning(message, RuntimeError("kernel version mismatch"))
        assert [r.getMessage() for r in caplog.records] == [message % "kernel version mismatch"]


def test_command_filters_are_narrow():
    """The commands drop the gradient_checkpointing rename notices of the TRL / transformers pair, and nothing else:
    another FutureWarning, or TRL's experimental warning raised for other code, is still shown."""
    import warnings

    from trl.import_utils import TRLExperimentalWarning

    from trl_tip.cli import quiet_third_party_noise

    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # Python's defaults, not this project's pytest filters (which ignore FutureWarning)
        warnings.simplefilter("default")
        quiet_third_party_noise()
        warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
        warnings.warn("`my_option` is deprecated and will be removed.", FutureWarning, stacklevel=1)
        warnings.warn("an experimental API the user imported", TRLExperimentalWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "`my_option` is deprecated and will be removed.",
        "an experimental API the user imported",
    ]


def test_demo_help_explains_every_option():
    """`trl-tip demo --help` had no text for most options, and did not say its rule differs from the library's."""
    from trl_tip.demo import make_parser

    parser = make_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) == 10 and all(a.help for a in options), [a.dest for a in options if not a.help]
    token_selection = next(a for a in options if a.dest == "token_selection")
    assert token_selection.default == "tip" and "TIPConfig defaults to entropy_sample" in token_selection.help
    assert "--verbose" in parser.format_help()
