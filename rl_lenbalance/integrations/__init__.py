"""Adapters for training frameworks: `trl`."""

from .trl import LenBalanceCallback, LenBalanceGRPOTrainer, LenBalanceMixin, LenBalanceRLOOTrainer, wrap_trainer

__all__ = ["LenBalanceCallback", "LenBalanceGRPOTrainer", "LenBalanceMixin", "LenBalanceRLOOTrainer", "wrap_trainer"]
