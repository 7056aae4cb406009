"""The registry of selection rules: name → how to build it, whether it keeps a budget, and which options it reads.

Every rule is registered once, where it is defined (`register_rule`); [`TIPConfig`] validates its options against the
registry (an option given for a rule that does not read it is an error) and [`build_selector`] builds the rule from a
validated config. A rule-specific option defaults to `None` in the config and is resolved here, so that "given" and
"left at its default" can be told apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


__all__ = [
    "RULES",
    "OptionSpec",
    "RuleSpec",
    "KEEP_RATIO",
    "build_selector",
    "check_option",
    "get_rule",
    "keep_ratio_defaults",
    "one_of",
    "option_default",
    "register_option",
    "register_rule",
]


@dataclass(frozen=True)
class OptionSpec:
    """A rule-specific option of the config.

    Attributes:
        name: Field name in the config.
        default: Value used when the option is left unset (`None`) for a rule that reads it.
        check: Returns an error message for a bad value, or `None` when the value is fine.
    """

    name: str
    default: Any = None
    check: Callable[[Any], str | None] | None = None


@dataclass(frozen=True)
class RuleSpec:
    """A selection rule as the config knows it.

    Attributes:
        name: Value of `token_selection`.
        build: Builds the selector from a validated config (options resolved).
        budgeted: Whether the rule keeps a share of the tokens (reads `keep_ratio`).
        default_keep_ratio: `keep_ratio` when left unset (budgeted rules only).
        options: Rule-specific options the rule reads (names of registered [`OptionSpec`]s).
        defaults: This rule's own defaults of some of its options (e.g. `budget_scope="rollout"`), overriding the
            option's default.
        required: Options the rule cannot do without (no default).
        summary: One line for the help text and the docs.
        source: Where the rule comes from (e.g. `"TIP Eq. 7-8"`), or `"trl-tip"` for our own.
        validate: Checks that need several options at once, `validate(args, given)` with `given` the names of the
            rule-specific options the user set (called after each option's own check and after the defaults are
            filled in); raises `ValueError`.
    """

    name: str
    build: Callable[[Any], Any]
    budgeted: bool
    default_keep_ratio: float | None = None
    options: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    summary: str = ""
    source: str = "trl-tip"
    validate: Callable[[Any, frozenset[str]], None] | None = None


RULES: dict[str, RuleSpec] = {}
OPTIONS: dict[str, OptionSpec] = {}


def register_option(spec: OptionSpec) -> OptionSpec:
    """Registers a rule-specific option (once per name)."""
    if spec.name in OPTIONS and OPTIONS[spec.name] != spec:
        raise ValueError(f"The option {spec.name!r} is registered twice with different specs.")
    OPTIONS[spec.name] = spec
    return spec


def register_rule(spec: RuleSpec) -> RuleSpec:
    """Registers a selection rule under `spec.name`; its options must be registered first."""
    if spec.name in RULES:
        raise ValueError(f"The selection rule {spec.name!r} is registered twice.")
    unknown = [name for name in spec.options if name not in OPTIONS]
    if unknown:
        raise ValueError(f"Rule {spec.name!r} reads unregistered options {unknown}; register them first.")
    if spec.budgeted and not spec.default_keep_ratio:
        raise ValueError(f"Budgeted rule {spec.name!r} needs a default_keep_ratio.")
    stray = sorted(set(spec.defaults) - set(spec.options))
    if stray:
        raise ValueError(f"Rule {spec.name!r} gives defaults for options it does not read: {stray}.")
    RULES[spec.name] = spec
    return spec


def one_of(name: str, allowed: tuple[str, ...]) -> Callable[[Any], str | None]:
    """An [`OptionSpec`] check: the error message for a value of option `name` that is not in `allowed`, else `None`."""

    def check(value) -> str | None:
        return None if value in allowed else f"{name}={value!r} is unknown; allowed values: {', '.join(allowed)}."

    return check


def _keep_ratio(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"keep_ratio must be a number in (0, 1], got {type(value).__name__} {value!r}."
    return None if 0.0 < value <= 1.0 else f"keep_ratio must be in (0, 1], got {value}."


# The budget option of every budgeted rule (its default is the rule's `default_keep_ratio`).
KEEP_RATIO = OptionSpec("keep_ratio", None, _keep_ratio)


def check_option(name: str | OptionSpec, value: Any) -> Any:
    """`value` if the option's registered check accepts it, else a `ValueError` with the check's message naming the
    option and its allowed values: the one check a rule's constructor and the config validation both run."""
    spec = name if isinstance(name, OptionSpec) else OPTIONS[name]
    problem = None if spec.check is None else spec.check(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def keep_ratio_defaults() -> str:
    """The default `keep_ratio` of the budgeted rules, as the help texts show it: the most common default, then the
    rules with another one, e.g. `"0.5; 0.1 for q3_score, divergence_topk; 0.6 for sstoken"`."""
    by_value: dict[float, list[str]] = {}
    for spec in RULES.values():
        if spec.budgeted:
            by_value.setdefault(spec.default_keep_ratio, []).append(spec.name)
    if not by_value:
        return ""
    common = max(by_value, key=lambda value: len(by_value[value]))
    others = [f"{value:g} for {', '.join(names)}" for value, names in by_value.items() if value != common]
    return "; ".join([f"{common:g}", *others])


def option_default(rule: RuleSpec, name: str) -> Any:
    """The value option `name` takes for `rule` when left unset: the rule's own default, else the option's."""
    return rule.defaults[name] if name in rule.defaults else OPTIONS[name].default


def get_rule(name: str) -> RuleSpec:
    """The registered rule `name`, or a `ValueError` listing the allowed values."""
    if name not in RULES:
        raise ValueError(f"token_selection={name!r} is not a selection rule; allowed values: {', '.join(RULES)}.")
    return RULES[name]


def build_selector(args) -> Any:
    """Builds the selector named by `args.token_selection` from a validated [`TIPConfig`] (or
    `TIPDistillationConfig`).

    Args:
        args: The training configuration (already validated, options resolved).

    Returns:
        [`TokenSelector`]: The selection rule.
    """
    return get_rule(args.token_selection).build(args)
