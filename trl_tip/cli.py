"""The `trl-tip` command: `demo` (tiny CPU distillation), `train` (from a YAML recipe), `report RUN_DIR`."""

from __future__ import annotations

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


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<8} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        message = (
            "usage: trl-tip COMMAND [options]\n\ncommands:\n"
            + "\n".join(lines)
            + "\n\n`trl-tip COMMAND --help` shows a command's options."
        )
        if argv and argv[0] not in ("-h", "--help"):
            sys.exit(f"trl-tip: unknown command {argv[0]!r}\n{message}")
        print(message)
        return
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    module.main(argv[1:])


if __name__ == "__main__":
    main()
