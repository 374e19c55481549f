"""ForeLen-style benchmark of length predictors on real generations of the policy model (EGTP, PLP and the
paper's baselines): `python -m benchmarks.forelen build`, then `... run`."""

from .config import SCENARIOS, BuildConfig, RunConfig
from .dataset import STEPS, BenchData, check_compatible

__all__ = ["SCENARIOS", "STEPS", "BenchData", "BuildConfig", "RunConfig", "check_compatible"]
