"""Selection rules: pure maps from per-token signals to a keep-mask or weights, and the registry that names them."""

from __future__ import annotations

from .base import (
    QUADRANTS,
    SelectionContext,
    TokenSelector,
    assign_quadrants,
    budget,
    sample_without_replacement,
    top_k_mask,
    validate_selection,
)
from .compose import Intersect, Union
from .registry import RULES, OptionSpec, RuleSpec, build_selector, get_rule, register_option, register_rule
from .rules import (
    AllTokens,
    EntropyDivergenceSample,
    EntropySample,
    EntropyTopK,
    QuadrantSubset,
    RandomTokens,
    TypeAware,
    parse_quadrants,
)


def __getattr__(name: str):
    # The names of the registered rules; a function of the registry, so that rules registered by other packages
    # (ssToken registers itself on import) are listed.
    if name == "TOKEN_SELECTIONS":
        from .. import sstoken  # noqa: F401  (registers the sstoken rule)

        return tuple(RULES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "QUADRANTS",
    "RULES",
    "TOKEN_SELECTIONS",
    "AllTokens",
    "EntropyDivergenceSample",
    "EntropySample",
    "EntropyTopK",
    "Intersect",
    "OptionSpec",
    "QuadrantSubset",
    "RandomTokens",
    "RuleSpec",
    "SelectionContext",
    "TokenSelector",
    "TypeAware",
    "Union",
    "assign_quadrants",
    "budget",
    "build_selector",
    "get_rule",
    "parse_quadrants",
    "register_option",
    "register_rule",
    "sample_without_replacement",
    "top_k_mask",
    "validate_selection",
]
