"""What the commands and the library print: no third-party noise that trl-tip's own imports and calls cause, and
every warning that concerns the user's code still shown."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_args

from trl_tip import TIPTrainer
from trl_tip._compat import GKDConfig, GKDTrainer
from trl_tip._quiet import BNB_CPU_LOGGER, KERNELS_LOGGER, raised_log_level
from trl_tip.trainers.gkd import GKD_MIGRATION_HINT


ROOT = Path(__file__).resolve().parents[1]


def _env(**overrides: str | None) -> dict[str, str]:
    """The environment of a user's shell: no TRL_EXPERIMENTAL_SILENCE, this checkout importable; `None` unsets."""
    env = {k: v for k, v in os.environ.items() if k != "TRL_EXPERIMENTAL_SILENCE"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for key, value in overrides.items():
        env.pop(key, None)
        if value is not None:
            env[key] = value
    return env


def _run(*args: str, timeout: int = 600, **env: str | None) -> subprocess.CompletedProcess:
    """`python -m trl_tip ARGS` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "trl_tip", *args],
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=timeout,
        cwd=ROOT,
    )


PROGRESS_BAR = re.compile(r"^[^|]*\d+%\|.*\|.*\]$")


def _not_progress_bars(stderr: str) -> list[str]:
    """The lines of `stderr` that are not tqdm progress bars (which redraw with carriage returns)."""
    lines = [line.strip() for line in re.split(r"[\r\n]", stderr)]
    return [line for line in lines if line and not PROGRESS_BAR.match(line)]


@pytest.mark.slow
@pytest.mark.parametrize("hub_offline", ["1", None], ids=["hub_offline", "hub_online"])
def test_import_prints_nothing(hub_offline):
    """With transformers 5.25 `kernels` is installed, and bitsandbytes (imported by PEFT through the Trainer) printed
    "Skipping publisher trust check ..." and "Failed to load CPU gemm_4bit_forward ..." on every `import trl_tip`
    (offline; online without network it fails with another wording)."""
    code = "import trl_tip, bitsandbytes, logging; print(logging.getLogger('kernels').level)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(HF_HUB_OFFLINE=hub_offline), cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == "0\n"  # the kernels logger is back at its level after the import


@pytest.mark.slow
@pytest.mark.parametrize("args", [(), ("demo", "--help"), ("report", "--help")], ids=["usage", "demo", "report"])
def test_command_help_prints_nothing_on_stderr(args):
    result = _run(*args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout.startswith("usage: ")


@pytest.mark.slow
def test_train_help_prints_only_the_help():
    """Importing trl-tip (here for `trl-tip train --help`) printed TRL's experimental warning first."""
    result = _run("train", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("usage: trl-tip train [--config RECIPE.yaml]")


@pytest.mark.slow
def test_demo_and_report_print_progress_bars_and_their_output_only(tmp_path):
    """On stderr the demo draws its progress bars and nothing else; `trl-tip report` writes nothing there."""
    result = _run(
        "demo",
        "--max_steps",
        "2",
        "--teacher_steps",
        "2",
        "--student_steps",
        "1",
        "--output_dir",
        str(tmp_path),
        "--dump_tokens_every",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert "quadrant" in result.stdout and "Q3 low H, high D" in result.stdout
    assert "{'loss'" not in result.stdout and "'tip/q1/frac'" not in result.stdout  # no log dicts without --verbose
    assert "pretraining the teacher" in result.stderr and "100%" in result.stderr  # progress bars
    assert _not_progress_bars(result.stderr) == []
    report = _run("report", str(tmp_path))
    assert report.returncode == 0, report.stderr
    assert report.stderr == "" and "tokens.html" in report.stdout


def test_progress_bar_lines_are_told_from_other_lines():
    stderr = (
        "\rpretraining the teacher:  50%|█████     | 1/2 [00:01<00:01,  1.01s/it]\r 100%|██████████| 2/2 [00:04<00:00,"
        "  2.09s/it]\nSkipping publisher trust check for 'x/y' because Hugging Face Hub is in offline mode.\n"
    )
    assert _not_progress_bars(stderr) == [
        "Skipping publisher trust check for 'x/y' because Hugging Face Hub is in offline mode."
    ]


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


def test_kernel_fetch_loggers_are_raised_to_error_during_the_block_only(caplog):
    """bitsandbytes is imported with the loggers of its kernel fetch (`kernels.*`, its CPU backend) at ERROR: their
    warnings, whatever the wording, are dropped; their errors, other loggers' warnings and later warnings are kept."""
    hub_logger = logging.getLogger(KERNELS_LOGGER + "._internals.hf_hub")  # a child: inherits the level
    bnb_logger = logging.getLogger(BNB_CPU_LOGGER)
    other_logger = logging.getLogger("bitsandbytes.cextension")
    with caplog.at_level(logging.WARNING):
        with raised_log_level((BNB_CPU_LOGGER, KERNELS_LOGGER)):
            hub_logger.warning("Skipping publisher trust check for 'kernels-community/x'")
            bnb_logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", "any wording")
            hub_logger.error("a kernel error")
            other_logger.warning("compiled without GPU support")
        assert [r.getMessage() for r in caplog.records] == ["a kernel error", "compiled without GPU support"]
        bnb_logger.warning("a later warning")
        assert caplog.records[-1].getMessage() == "a later warning"
    assert logging.getLogger(KERNELS_LOGGER).level == logging.NOTSET and bnb_logger.level == logging.NOTSET


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
