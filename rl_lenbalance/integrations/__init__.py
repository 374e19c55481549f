"""Adapters for TRL trainers."""

from .callback import LenBalanceCallback, wrap_trainer
from .grpo import LenBalanceGRPOTrainer, LenBalanceMixin, LenBalanceRLOOTrainer

__all__ = ["LenBalanceCallback", "LenBalanceGRPOTrainer", "LenBalanceMixin", "LenBalanceRLOOTrainer", "wrap_trainer"]
