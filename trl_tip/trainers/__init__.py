"""Thin adapters of the selection engine to TRL's two on-policy distillation trainers."""

from .common import ForwardView, TIPTrainerMixin
from .distillation import TIPDistillationTrainer
from .gkd import TIPTrainer


__all__ = ["ForwardView", "TIPDistillationTrainer", "TIPTrainer", "TIPTrainerMixin"]
