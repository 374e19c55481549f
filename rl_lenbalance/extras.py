"""The optional dependencies, `pip install "rl-lenbalance[EXTRA]"`: training with the callback or the trainer needs
none of them; a command that does gets a one-line error naming the install that adds it."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"matplotlib": "report", "wandb": "report", "gguf": "demo", "rich": "demo"}  # package -> its extra


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the `pip install` that adds it."""


def require(package: str, purpose: str) -> ModuleType:
    """`import package`, or `MissingExtraError`: "<purpose> needs <package> ...: pip install ..."."""
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise MissingExtraError(f"{purpose} needs {package}, which is not installed: "
                                f'pip install "rl-lenbalance[{EXTRAS[package]}]"') from error
