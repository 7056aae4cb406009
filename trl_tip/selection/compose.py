"""Composition of selectors: `Intersect(a, b)` keeps what both keep, `Union(a, b)` what either keeps."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..signals import TokenSignals
from .base import TOKEN_SIGNALS, SelectionContext, planned_kept, required_signals, validate_selection


__all__ = ["Intersect", "Union"]


class _Combine:
    """Runs two selectors and combines their keep-masks (weight > 0 means kept)."""

    op_name = ""

    def __init__(self, first: Callable, second: Callable):
        for name, selector in (("first", first), ("second", second)):
            if not callable(selector):
                raise TypeError(f"{type(self).__name__}: {name} selector must be callable, got {selector!r}.")
        self.first, self.second = first, second
        declared = [frozenset(getattr(part, "requires", ())) for part in (first, second)]
        # A part that does not declare its signals reads them all: the union says so once the other part declares.
        if any(names & TOKEN_SIGNALS for names in declared):
            self.requires = required_signals(first) | required_signals(second)
        else:
            self.requires = declared[0] | declared[1]

    def _masks(self, signals: TokenSignals, context: SelectionContext) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(signals)
        a = validate_selection(self.first(signals, context), n, name=repr(self.first)) > 0
        b = validate_selection(self.second(signals, context), n, name=repr(self.second)) > 0
        return a, b

    def compute_metrics(self, reduce_sum=None) -> dict[str, float]:
        """Metrics of the parts that report some (every process must call it at the same time)."""
        metrics = {}
        for part in (self.first, self.second):
            if hasattr(part, "compute_metrics"):
                metrics.update(part.compute_metrics(reduce_sum))
        return metrics

    def state_dict(self) -> dict:
        """State of the parts that have one."""
        return {
            key: part.state_dict()
            for key, part in (("first", self.first), ("second", self.second))
            if hasattr(part, "state_dict")
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores what [`state_dict`] returned."""
        for key, part in (("first", self.first), ("second", self.second)):
            if key in state and hasattr(part, "load_state_dict"):
                part.load_state_dict(state[key])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.first!r}, {self.second!r})"


class Intersect(_Combine):
    """Keeps the tokens both selectors keep, e.g. `Intersect(SSToken(), QuadrantSubset(["Q3"]))`.

    Its loss denominator is the smaller of the parts' planned counts (it keeps at most that many).
    """

    def planned_kept(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.minimum(planned_kept(self.first, lengths), planned_kept(self.second, lengths))

    def __call__(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        a, b = self._masks(signals, context)
        return a & b


class Union(_Combine):
    """Keeps the tokens either selector keeps, e.g. `Union(SSToken(), QuadrantSubset(["Q3"]))`.

    Its loss denominator is the larger of the parts' planned counts (it keeps at least that many).
    """

    def planned_kept(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.maximum(planned_kept(self.first, lengths), planned_kept(self.second, lengths))

    def __call__(self, signals: TokenSignals, context: SelectionContext) -> torch.Tensor:
        a, b = self._masks(signals, context)
        return a | b
