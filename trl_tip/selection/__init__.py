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
from .sstoken import (
    DEFAULT_SSTOKEN_LOSS,
    PROMPT_ATTENTION,
    SSTOKEN_LOSSES,
    Intersect,
    SSToken,
    Union,
    history_requirement,
    per_sequence_minmax,
    per_sequence_top_k,
    retrospective_excess_loss,
    sstoken_score,
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


TOKEN_SELECTIONS = (
    "all",
    "random",
    "entropy_topk",
    "entropy_sample",
    "entropy_divergence_sample",
    "quadrants",
    "tip",
    "sstoken",
)


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
    if rule == "sstoken":
        return SSToken(
            keep_ratio,
            gamma=args.sstoken_gamma,
            loss=args.sstoken_loss or DEFAULT_SSTOKEN_LOSS,
            warmup_steps=args.sstoken_warmup_steps or 0,
        )
    raise ValueError(f"Unknown token_selection {rule!r}; allowed values: {', '.join(TOKEN_SELECTIONS)}.")


__all__ = [
    "PROMPT_ATTENTION",
    "QUADRANTS",
    "SSTOKEN_LOSSES",
    "TOKEN_SELECTIONS",
    "AllTokens",
    "EntropyDivergenceSample",
    "EntropySample",
    "EntropyTopK",
    "Intersect",
    "QuadrantSubset",
    "RandomTokens",
    "SSToken",
    "SelectionContext",
    "TokenSelector",
    "TypeAware",
    "Union",
    "assign_quadrants",
    "budget",
    "build_selector",
    "history_requirement",
    "parse_quadrants",
    "per_sequence_minmax",
    "per_sequence_top_k",
    "retrospective_excess_loss",
    "sample_without_replacement",
    "sstoken_score",
    "top_k_mask",
    "validate_selection",
]
