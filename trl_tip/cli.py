"""The `trl-tip` command: `demo` (tiny CPU distillation), `train` (from a YAML recipe), `report RUN_DIR`."""

from __future__ import annotations

import sys


COMMANDS = {
    "demo": ("trl_tip.demo", "tiny end-to-end distillation on CPU, prints the Q1-Q4 table"),
    "train": ("trl_tip.train", "distil a teacher into a student from a YAML recipe (--config) and flags"),
    "report": ("trl_tip.report", "figures, TIP map and token page of a run: trl-tip report RUN_DIR"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<8} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        message = "usage: trl-tip COMMAND [options]\n\ncommands:\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            sys.exit(f"trl-tip: unknown command {argv[0]!r}\n{message}")
        print(message)
        return
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    module.main(argv[1:])


if __name__ == "__main__":
    main()
