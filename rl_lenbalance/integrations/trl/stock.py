"""Reaching stock TRL from rl-lenbalance's overrides."""

from __future__ import annotations

import functools


def stock_when_reentered(method):
    """Run the stock method when the override is re-entered on the same trainer. A script may wrap the stock method
    at class level with a call back into the trainer (`patch.object(GRPOTrainer, "training_step",
    wraps=trainer.training_step)`, as TRL's own tests do); `super()` then reaches the wrapper, which calls this
    override again, and would recurse forever. `type(self)._lenbalance_stock` holds the stock methods
    (`LenBalanceMixin.__init_subclass__`)."""
    name = method.__name__

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        active = self.__dict__.setdefault("_lenbalance_active", set())
        if name in active:
            return type(self)._lenbalance_stock[name](self, *args, **kwargs)
        active.add(name)
        try:
            return method(self, *args, **kwargs)
        finally:
            active.discard(name)

    return guarded
