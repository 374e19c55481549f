"""rl-lenbalance: length-aware rollout balancing for TRL, driven by an online-trained length predictor."""

from importlib import import_module
from importlib.metadata import version

from packaging.version import Version

if Version(version("transformers")).release < (5, 10):  # pip enforces it; a `--no-deps` install may not
    raise ImportError(f"rl-lenbalance needs transformers>=5.10 (this environment has {version('transformers')}): "
                      "pip install 'transformers>=5.10'")

from .config import LenBalanceConfig  # noqa: E402

__all__ = ["LenBalanceCallback", "LenBalanceConfig", "LenBalanceGRPOTrainer", "LenBalanceRLOOTrainer", "wrap_trainer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """Import the TRL adapters on first use, so the pure modules load without importing TRL."""
    if name in ("LenBalanceCallback", "LenBalanceGRPOTrainer", "LenBalanceRLOOTrainer", "wrap_trainer"):
        return getattr(import_module(".integrations", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
