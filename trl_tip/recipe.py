"""How `trl-tip train` reads a recipe and a command line before TRL's parser sees them.

Two things a TRL user expects that `TrlParser` alone does not do:

- **A recipe runs under either trainer.** A GKD recipe (`lmbda`, `max_new_tokens`, ...) under `--trainer
  distillation`, or a DistillationTrainer recipe (`max_completion_length`, `top_p`, ...) under `--trainer gkd`: every
  key of the other trainer's config is translated where it has an equivalent (`max_new_tokens` ↔
  `max_completion_length`; a GKD sampling temperature `t` becomes DistillationTrainer's `temperature=1` with
  `generation_kwargs={"temperature": t}`, which samples at `t` and takes the loss at 1 as GKD does), dropped where
  it changes nothing (`lmbda: 1.0`, `seq_kd: false`, an option left at its default), and refused with one line where
  it would change the training (`lmbda < 1`, `seq_kd: true`, `use_vllm: true`, ...). One info line lists what was
  translated and dropped.
- **A rule given on the command line replaces the recipe's rule.** `--token_selection all` on a recipe that sets
  `keep_ratio` drops the recipe's options the new rule does not read (one info line says which); an option given on
  the command line for a rule that does not read it stays an error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from ._compat import argparse_actions


__all__ = ["CommandLine", "RecipeError", "load_recipe", "read_command_line", "translate"]

SHORT_NAMES = {"gkd": "GKDTrainer", "distillation": "DistillationTrainer"}
TRAINER_NAMES = {"gkd": "TIPTrainer (GKDTrainer)", "distillation": "TIPDistillationTrainer (DistillationTrainer)"}


class RecipeError(ValueError):
    """A recipe or command-line option that cannot be carried over to the chosen trainer."""


@dataclass
class CommandLine:
    """A `trl-tip train` command line, read before TRL's parser: the recipe's keys and the flags given.

    Attributes:
        recipe: The recipe's keys (`None` without `--config`), after translation.
        recipe_path: The `--config` path.
        flags: `(dest, option, values)` of each flag given, in order, after translation (`values`: the strings that
            followed the option).
        other: Tokens that are not flags of either trainer (left to TRL's parser, which refuses unknown options).
        notes: Info lines on what was translated or dropped.
    """

    recipe: dict[str, Any] | None = None
    recipe_path: str | None = None
    flags: list[tuple[str, str, list[str]]] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def argv(self) -> list[str]:
        """The command line for TRL's parser (without `--config`)."""
        out = []
        for _, option, values in self.flags:
            out += [option, *values]
        return out + self.other

    def given(self) -> set[str]:
        return {dest for dest, _, _ in self.flags}


def load_recipe(path: str) -> dict[str, Any]:
    """The keys of a YAML recipe (TRL's `env:` mapping is applied to `os.environ` and removed, as TRL does)."""
    import yaml

    if not os.path.isfile(path):
        raise RecipeError(
            f"--config {path}: no such file; give the path of a YAML recipe, e.g. recipes/*/lora_tip.yaml."
        )
    with open(path, encoding="utf-8") as f:
        try:
            recipe = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise RecipeError(f"--config {path} is not valid YAML: {' '.join(str(error).split())}") from error
    if not isinstance(recipe, dict):
        raise RecipeError(f"--config {path} must be a YAML mapping of option: value, got {type(recipe).__name__}.")
    env = recipe.pop("env", None) or {}
    if not isinstance(env, dict):
        raise RecipeError(f"--config {path}: `env` must be a mapping of variable: value.")
    for key, value in env.items():
        os.environ[str(key)] = str(value)
    return recipe


def _option_map(parser) -> dict[str, Any]:
    return {option: action for action in argparse_actions(parser) for option in action.option_strings}


def read_command_line(argv: list[str], parser, other_parser) -> CommandLine:
    """Splits `argv` into the recipe (`--config`), the flags of `parser` or `other_parser` (the other trainer's), and
    the rest. A flag's values are the tokens up to the next `--option` (or the part after `=`)."""
    target, other = _option_map(parser), _option_map(other_parser)
    line = CommandLine()
    i = 0
    while i < len(argv):
        token = argv[i]
        option, eq, inline = token.partition("=")
        if token.startswith("--") and option == "--config":
            if eq:
                line.recipe_path = inline
            elif i + 1 < len(argv):
                line.recipe_path = argv[i + 1]
                i += 1
            else:
                raise RecipeError("--config needs a path: --config RECIPE.yaml.")
            i += 1
            continue
        action = target.get(option) or other.get(option) if token.startswith("--") else None
        if action is None or not action.option_strings:
            line.other.append(token)
            i += 1
            continue
        values = [inline] if eq else []
        i += 1
        if not eq:
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        line.flags.append((action.dest, option, values))
    if line.recipe_path is not None:
        line.recipe = load_recipe(line.recipe_path)
    return line


# --------------------------------------------------------------------------------------------------------- trainers


def _defaults(config_class) -> dict[str, Any]:
    out = {}
    for f in fields(config_class):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def _convert(action, values: list[str]) -> Any:
    """A flag's value as the parser would read it (the raw strings when they do not convert)."""
    if not values:
        return action.const if action.const is not None else True
    convert = action.type if callable(action.type) else (lambda v: v)
    try:
        converted = [convert(v) for v in values]
    except Exception:  # noqa: BLE001 - left to the parser's own error
        return " ".join(values)
    return converted if action.nargs in ("+", "*") else converted[0]


def _is_default(value: Any, default: Any) -> bool:
    if value is None or value == default:
        return True
    return isinstance(value, str) and str(default).lower() == value.lower()


# Rules for the keys of one trainer's config that the other lacks: (key, value, source, target) -> the translated
# `{key: value}` (empty: dropped) and a note, or a RecipeError. Keys without a rule are dropped at their default and
# refused otherwise.
def _max_new_tokens(key, value, source, target):
    return {"max_completion_length": value}, f"max_new_tokens={value} -> max_completion_length={value}"


def _max_completion_length(key, value, source, target):
    return {"max_new_tokens": value}, f"max_completion_length={value} -> max_new_tokens={value}"


def _lmbda(key, value, source, target):
    if float(value) == 1.0:
        return {}, f"lmbda={value} dropped (DistillationTrainer is always on-policy)"
    raise RecipeError(
        f"lmbda={value}: GKD's lmbda < 1 trains part of the steps on the dataset's own completions; "
        "TIPDistillationTrainer is always on-policy (lmbda=1). Use --trainer gkd, or set --lmbda 1.0."
    )


def _seq_kd(key, value, source, target):
    if not _truthy(value):
        return {}, None
    raise RecipeError(
        "seq_kd=True: GKD's sequence-level KD trains on the teacher's own completions; TIPDistillationTrainer has no "
        "equivalent. Use --trainer gkd, or set --seq_kd false."
    )


def _max_length(key, value, source, target):
    return {}, (
        f"max_length={value} dropped (DistillationTrainer does not truncate prompts: filter long ones; completions "
        "stop at max_completion_length)"
    )


def _dropped_logging(key, value, source, target):
    return {}, f"{key}={value} dropped (a DistillationTrainer logging option)"


def _use_vllm(key, value, source, target):
    if not _truthy(value):
        return {}, None
    raise RecipeError(
        "use_vllm=True: TIPTrainer (GKD) generates with transformers, not vLLM (on a GPU, --fast_generation true is "
        "its fast path). Use --trainer distillation, or set --use_vllm false."
    )


def _generation_kwargs(key, value, source, target):
    if not value:
        return {}, None
    if isinstance(value, dict) and set(value) == {"temperature"}:
        return {"_sampling_temperature": value["temperature"]}, None  # resolved with `temperature` below
    raise RecipeError(
        f"generation_kwargs={value}: TIPTrainer (GKD) has no generation_kwargs; it samples with temperature and "
        "max_new_tokens only. Use --trainer distillation, or remove generation_kwargs."
    )


def _teacher_revision(key, value, source, target):
    if value is None:
        return {}, None
    raise RecipeError(
        f"teacher_model_revision={value!r} is a DistillationTrainer option; for --trainer gkd put the revision in "
        f"teacher_model_init_kwargs (teacher_model_init_kwargs: {{revision: {value}}} in the recipe)."
    )


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() in ("yes", "true", "t", "y", "1")
    return bool(value)


RULES_TO_DISTILLATION: dict[str, Callable] = {
    "max_new_tokens": _max_new_tokens,
    "lmbda": _lmbda,
    "seq_kd": _seq_kd,
    "max_length": _max_length,
}
RULES_TO_GKD: dict[str, Callable] = {
    "max_completion_length": _max_completion_length,
    "use_vllm": _use_vllm,
    "generation_kwargs": _generation_kwargs,
    "teacher_model_revision": _teacher_revision,
    "log_completions": _dropped_logging,
    "num_completions_to_print": _dropped_logging,
    "log_unique_prompts": _dropped_logging,
}


def _translate_key(key, value, source, target, source_defaults) -> tuple[dict[str, Any], str | None]:
    rules = RULES_TO_DISTILLATION if target == "distillation" else RULES_TO_GKD
    if key in rules:
        return rules[key](key, value, source, target)
    if _is_default(value, source_defaults.get(key)):
        return {}, f"{key}={value} dropped (its default)" if value is not None else None
    raise RecipeError(
        f"{key}={value} is an option of {TRAINER_NAMES[source]} that {TRAINER_NAMES[target]} does not have; remove "
        f"it, or use --trainer {source}."
    )


def _format(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


# Options of both configs whose defaults differ; a recipe written for one trainer keeps its trainer's default.
CARRIED_DEFAULTS = ("beta", "temperature", "learning_rate", "disable_dropout", "shuffle_dataset")


def _recipe_trainer(recipe: dict[str, Any], other_only: set[str], own_only: set[str], other: str, trainer: str) -> str:
    """The trainer a recipe was written for: its `trainer:` key, else the trainer whose own options it sets (the
    chosen one when it sets none of either)."""
    if recipe.get("trainer") is not None:
        return str(recipe["trainer"])
    return other if set(recipe) & other_only and not set(recipe) & own_only else trainer


def translate_trainer(line: CommandLine, parser, other_parser, config, other_config, trainer: str, other: str):
    """Translates the keys of `other`'s config (recipe and flags) into `trainer`'s, in place (see the module)."""
    own = {f.name for f in fields(config)}
    foreign = {f.name for f in fields(other_config)} - own
    other_defaults = _defaults(other_config)
    other_actions = {a.dest: a for a in argparse_actions(other_parser) if a.option_strings}
    notes: list[str] = []
    recipe = line.recipe or {}
    given = line.given()
    recipe_trainer = _recipe_trainer(recipe, foreign, own - {f.name for f in fields(other_config)}, other, trainer)
    if line.recipe and recipe_trainer != trainer:
        # The recipe relies on its trainer's defaults where the two differ: keep them (and always on-policy).
        own_defaults = _defaults(config)
        carried: dict[str, Any] = {"lmbda": 1.0} if trainer == "gkd" else {}
        carried.update(
            {key: other_defaults[key] for key in CARRIED_DEFAULTS if other_defaults[key] != own_defaults[key]}
        )
        for key, value in carried.items():
            if key not in recipe and key not in given:
                recipe[key] = value
                if key == "lmbda":
                    notes.append("lmbda=1.0 (always on-policy, as DistillationTrainer)")
                elif not (key == "temperature" and trainer == "distillation"):  # that one is translated below
                    notes.append(f"{key}={value} ({SHORT_NAMES[other]}'s default, kept)")

    extra_recipe: dict[str, Any] = {}
    for key in [k for k in recipe if k in foreign]:
        value = recipe.pop(key)
        if key in given:
            continue  # the flag replaces the recipe's value
        translated, note = _translate_key(key, value, other, trainer, other_defaults)
        extra_recipe.update(translated)
        if note:
            notes.append(note)
    flags = []
    for dest, option, values in line.flags:
        if dest not in foreign:
            flags.append((dest, option, values))
            continue
        value = _convert(other_actions[dest], values)
        translated, note = _translate_key(dest, value, other, trainer, other_defaults)
        for key, new_value in translated.items():
            if key == "_sampling_temperature":
                key = "temperature"
                if key in given:
                    continue
                note = f"generation_kwargs={{'temperature': {new_value}}} -> temperature={new_value} (loss at 1)"
            flags.append((key, f"--{key}", [_format(new_value)]))
        if note:
            notes.append(note)
    line.flags = flags

    # Temperature: GKD samples at it and takes the loss at 1; DistillationTrainer does both at it.
    sampling = extra_recipe.pop("_sampling_temperature", None)
    if recipe_trainer != trainer and "temperature" in recipe and "temperature" not in given:
        t = float(recipe["temperature"])
        if trainer == "distillation" and t != 1.0:
            recipe["temperature"] = 1.0
            kwargs = dict(recipe.get("generation_kwargs") or {})
            kwargs["temperature"] = t
            recipe["generation_kwargs"] = kwargs
            notes.append(
                f"temperature={t} -> generation_kwargs={{'temperature': {t}}} (sampled at {t}, loss at 1, as GKD)"
            )
        elif trainer == "gkd" and t != 1.0:
            raise RecipeError(
                f"temperature={t}: the recipe is for --trainer distillation, which samples and takes the loss at it; "
                f"TIPTrainer (GKD) takes the loss at 1. Give --temperature {t} to sample at {t} with the loss at 1, "
                "or use --trainer distillation."
            )
    if sampling is not None and "temperature" not in given:
        recipe["temperature"] = sampling
        notes.append(f"generation_kwargs={{'temperature': {sampling}}} -> temperature={sampling} (loss at 1)")
    for key, value in extra_recipe.items():
        if key not in given:
            recipe[key] = value
    if notes:
        source = f"recipe for --trainer {other}" if line.recipe and recipe_trainer != trainer else "options"
        line.notes.append(f"{source} run with --trainer {trainer}: " + "; ".join(notes) + ".")


def switch_rule(line: CommandLine) -> None:
    """With `--token_selection` on the command line, drops the recipe's rule options the new rule does not read."""
    from .selection.registry import OPTIONS, RULES

    if not line.recipe:
        return
    rule_flags = [values for dest, _, values in line.flags if dest == "token_selection"]
    if not rule_flags or len(rule_flags[-1]) != 1 or rule_flags[-1][0] not in RULES:
        return  # no rule on the command line, or an unknown one (the config names the allowed values)
    rule = RULES[rule_flags[-1][0]]
    reads = set(rule.options) | ({"keep_ratio"} if rule.budgeted else set())
    given = line.given()
    dropped = [
        f"{key}={_format(line.recipe.pop(key))}"
        for key in [k for k in line.recipe if k in set(OPTIONS) | {"keep_ratio"}]
        if key not in reads and key not in given
    ]
    if dropped:
        previous = line.recipe.get("token_selection", "entropy_sample")
        line.notes.append(
            f"--token_selection {rule.name} replaces the recipe's {previous}: dropped the recipe's "
            f"{', '.join(dropped)} ({rule.name} does not read {'it' if len(dropped) == 1 else 'them'})."
        )


def translate(line: CommandLine, trainer: str, parser, other_parser) -> CommandLine:
    """Translates a command line read by [`read_command_line`] for `trainer` (`"gkd"` or `"distillation"`), whose
    parser is `parser` (`other_parser`: the other trainer's)."""
    from .config import TIPConfig, TIPDistillationConfig

    other = "distillation" if trainer == "gkd" else "gkd"
    configs = {"gkd": TIPConfig, "distillation": TIPDistillationConfig}
    switch_rule(line)
    translate_trainer(line, parser, other_parser, configs[trainer], configs[other], trainer, other)
    return line


def print_notes(notes: list[str]) -> None:
    """Prints the info lines once (on the main process of a distributed launch)."""
    if os.environ.get("RANK", "0") != "0":
        return
    for note in notes:
        print(f"trl-tip train: {note}", file=sys.stderr, flush=True)
