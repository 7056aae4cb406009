"""Selection rules: pure maps from per-token signals to a keep-mask or weights."""

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
from .tip import (
    AllTokens,
    EntropyDivergenceSample,
    EntropySample,
    EntropyTopK,
    QuadrantSubset,
    RandomTokens,
    TypeAware,
    parse_quadrants,
)


TOKEN_SELECTIONS = ("all", "random", "entropy_topk", "entropy_sample", "entropy_divergence_sample", "quadrants", "tip")


def build_selector(args) -> TokenSelector:
    """Builds the selector named by `args.token_selection` from the knobs of a [`TIPConfig`].

    Args:
        args ([`TIPConfig`]): The training configuration (already validated).

    Returns:
        [`TokenSelector`]: The selection rule.
    """
    rule = args.token_selection
    keep_ratio = args.keep_ratio
    if rule == "all":
        return AllTokens()
    if rule == "random":
        return RandomTokens(keep_ratio)
    if rule == "entropy_topk":
        return EntropyTopK(keep_ratio)
    if rule == "entropy_sample":
        return EntropySample(keep_ratio, alpha=args.entropy_alpha)
    if rule == "entropy_divergence_sample":
        return EntropyDivergenceSample(keep_ratio, alpha=args.entropy_alpha, gamma=args.divergence_gamma)
    if rule == "quadrants":
        return QuadrantSubset(args.quadrants)
    if rule == "tip":
        return TypeAware(keep_ratio, q3_share=args.tip_q3_share)
    raise ValueError(f"Unknown token_selection {rule!r}; allowed values: {', '.join(TOKEN_SELECTIONS)}.")


__all__ = [
    "QUADRANTS",
    "TOKEN_SELECTIONS",
    "AllTokens",
    "EntropyDivergenceSample",
    "EntropySample",
    "EntropyTopK",
    "QuadrantSubset",
    "RandomTokens",
    "SelectionContext",
    "TokenSelector",
    "TypeAware",
    "assign_quadrants",
    "budget",
    "build_selector",
    "parse_quadrants",
    "sample_without_replacement",
    "top_k_mask",
    "validate_selection",
]
