"""ForeLen-style benchmark of length predictors on real generations of the policy model (EGTP, PLP and the
paper's baselines): `python -m rl_lenbalance.bench build`, then `... run`."""

from .config import SCENARIOS, STEPS, BuildConfig, RunConfig
from .dataset import BenchData, check_compatible

__all__ = ["SCENARIOS", "STEPS", "BenchData", "BuildConfig", "RunConfig", "check_compatible"]
