"""TRL glue: the trainer mixin (`trainer`), its generation and loss-phase overrides, the callback."""

from .trainer import LenBalanceCallback, LenBalanceGRPOTrainer, LenBalanceMixin, LenBalanceRLOOTrainer, wrap_trainer

__all__ = ["LenBalanceCallback", "LenBalanceGRPOTrainer", "LenBalanceMixin", "LenBalanceRLOOTrainer", "wrap_trainer"]
