"""Adapters for TRL trainers."""

from .callback import LenBalanceCallback, wrap_trainer
from .grpo import LenBalanceGRPOTrainer, LenBalanceMixin

__all__ = ["LenBalanceCallback", "LenBalanceGRPOTrainer", "LenBalanceMixin", "wrap_trainer"]
