"""Selection rules: pure maps from per-token signals to a keep-mask or weights, and the registry that names them."""

from __future__ import annotations

from .base import (
    QUADRANTS,
    SelectionContext,
    TokenSelector,
    assign_quadrants,
    budget,
    planned_kept,
    sample_without_replacement,
    top_k_mask,
    validate_selection,
)
from .budget import BUDGET_SCOPES, SCORE_ORDERS, group_quotas, grouped_top_k, scoped_top_k
from .compose import Intersect, Union
from .normalize import MinMax, fit_minmax, nan_quantile
from .paper import DivergenceTopK, Q3Score, SoftOR, normalized_entropy_and_divergence
from .registry import RULES, OptionSpec, RuleSpec, build_selector, get_rule, register_option, register_rule
from .rules import (
    SAMPLING_ESTIMATORS,
    AllTokens,
    EntropyDivergenceSample,
    EntropySample,
    EntropyTopK,
    QuadrantBudget,
    QuadrantSubset,
    RandomTokens,
    parse_quadrants,
)


def __getattr__(name: str):
    # The names of the registered rules; a function of the registry, so that rules registered by plug-ins (imported
    # by `trl_tip/__init__.py`) are listed.
    if name == "TOKEN_SELECTIONS":
        return tuple(RULES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUDGET_SCOPES",
    "QUADRANTS",
    "RULES",
    "SAMPLING_ESTIMATORS",
    "SCORE_ORDERS",
    "TOKEN_SELECTIONS",
    "AllTokens",
    "DivergenceTopK",
    "EntropyDivergenceSample",
    "EntropySample",
    "EntropyTopK",
    "Intersect",
    "MinMax",
    "OptionSpec",
    "Q3Score",
    "QuadrantBudget",
    "QuadrantSubset",
    "RandomTokens",
    "RuleSpec",
    "SelectionContext",
    "SoftOR",
    "TokenSelector",
    "Union",
    "assign_quadrants",
    "budget",
    "build_selector",
    "fit_minmax",
    "get_rule",
    "group_quotas",
    "grouped_top_k",
    "nan_quantile",
    "normalized_entropy_and_divergence",
    "parse_quadrants",
    "planned_kept",
    "register_option",
    "register_rule",
    "sample_without_replacement",
    "scoped_top_k",
    "top_k_mask",
    "validate_selection",
]
