"""The `trl-tip` command: `demo` (tiny CPU distillation), `train` (from a YAML recipe), `report RUN_DIR`."""

from __future__ import annotations

import os
import sys


COMMANDS = {
    "demo": ("trl_tip.demo", "tiny end-to-end distillation on CPU, prints the Q1-Q4 table"),
    "train": ("trl_tip.train", "distil a teacher into a student from a YAML recipe (--config) and flags"),
    "report": ("trl_tip.report", "figures, TIP map and token page of a run: trl-tip report RUN_DIR"),
}

# Deprecation notices the installed TRL / transformers pair prints on every run, whatever the options: TRL's configs
# default `gradient_checkpointing=True` and TRL calls the `gradient_checkpointing_*` methods, which transformers 5.23
# renamed to `activation_checkpointing`; GKD's generation passes `return_dict_in_generate` next to a
# `generation_config`. The commands run no user code, so they drop them (the library does not).
GRADIENT_CHECKPOINTING_RENAME = r"`(is_)?gradient_checkpointing(_enable|_disable|_kwargs)?` is deprecated"
GENERATION_CONFIG_NOTICE = "Passing `generation_config` together with generation-related arguments"


def quiet_third_party_noise() -> None:
    """Drops, for a `trl-tip` command, the third-party notices that no option of the command can change."""
    import warnings

    from ._quiet import MessageFilter

    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_RENAME, category=FutureWarning)
    import logging

    generation_logger = logging.getLogger("transformers.generation.utils")
    if not any(isinstance(f, MessageFilter) for f in generation_logger.filters):
        generation_logger.addFilter(MessageFilter(GENERATION_CONFIG_NOTICE))


DEBUG_ENV = "TRL_TIP_DEBUG"
# What a user's input can raise: a bad option or value (ValueError, TypeError from a config), a missing file or model
# (OSError), a missing optional package (ImportError). Other exceptions are bugs and keep their traceback.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


def debug_requested(argv: list[str]) -> bool:
    """Whether `--debug` is on the command line or `TRL_TIP_DEBUG` is set (to anything but `0` or empty)."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def main(argv: list[str] | None = None) -> None:
    """The `trl-tip` command. A user error ends it with one line on stderr (what, which option, the fix) and exit
    code 2; `--debug` (or `TRL_TIP_DEBUG=1`) shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<8} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        message = (
            "usage: trl-tip COMMAND [options] [--debug]\n\ncommands:\n"
            + "\n".join(lines)
            + "\n\n`trl-tip COMMAND --help` shows a command's options; --debug (or TRL_TIP_DEBUG=1) shows the "
            "traceback of an error."
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"trl-tip: unknown command {argv[0]!r}\n{message}", file=sys.stderr)
            sys.exit(2)
        print(message)
        return
    import importlib

    try:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        module.main(argv[1:])
    except USER_ERRORS as error:
        if debug:
            raise
        sys.stderr.flush()
        print(f"trl-tip {argv[0]}: error: {short_message(error)}", file=sys.stderr)
        print(f"(--debug or {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)


def short_message(error: BaseException) -> str:
    """The error's message on one line (its type named when the message alone would not say what failed)."""
    text = " ".join(str(error).split())
    if isinstance(error, (ValueError, TypeError)) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


if __name__ == "__main__":
    main()
