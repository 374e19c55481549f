"""What `rl-lenbalance train` prints while it trains: the progress bar and one compact line per logged step, instead
of stock's full metrics dictionary (wandb and `trainer.state.log_history` keep every key), and no deprecation
warnings that TRL's own calls into transformers raise.

    step 2/4 · 3.91 s · loss padding 7.4% (stock 9.4%) · plan sorted (exploring, pass 2 of 4) · reward 0.125
    step 3/4 · 3.52 s · loss padding 7.1% (stock 9.0%) · plan sorted · generation compaction · reward 0.25
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from transformers import ProgressCallback

from ..ledger import logged_name
from ..loss import STRATEGIES

# transformers 5 renamed `gradient_checkpointing*` to `activation_checkpointing*`; TRL 1.16's
# `unwrap_model_for_generation` still reads the old names around every generation (stock TRL prints these too)
_TRL_DEPRECATIONS = r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated"


def step_line(logs: Mapping[str, Any], step: int, max_steps: int) -> str:
    """One logged step in a line: its seconds, the loss phase's padding vs stock's, the training plan that ran and
    the tuner's state, the generation plan where it was not stock's `generate` or was being measured, and the mean
    reward. A figure that was not logged is left out."""
    parts = [f"step {step}/{max_steps}" if max_steps > 0 else f"step {step}"]
    if _finite(logs.get("step_time")):
        parts.append(f"{logs['step_time']:.3g} s")
    pad, stock = logs.get("lenbalance/train/pad_frac"), logs.get("lenbalance/train/pad_frac_stock")
    if _finite(pad) and _finite(stock):
        parts.append(f"loss padding {pad:.1%} (stock {stock:.1%})")
    plan = plan_name(logs)
    if plan is not None:
        parts.append(f"plan {plan}{_tuner_state(logs)}")
    generation, exploring = logged_name(logs, "gen/plan"), logs.get("lenbalance/gen/exploring")
    if generation is not None and (generation != "stock" or exploring):
        parts.append(f"generation {generation}{' (exploring)' if exploring else ''}")
    if _finite(logs.get("reward")):
        parts.append(f"reward {logs['reward']:.3g}")
    return " · ".join(parts)


def plan_name(logs: Mapping[str, Any]) -> str | None:
    """The training plan this step ran (`lenbalance/autotune/strategy/<name>` at 1), else the one strategy whose pass
    was timed (`lenbalance/autotune/<name>_s_per_ktok`); None when neither names one (no plan logged, or passes of
    several plans averaged into one log)."""
    name = logged_name(logs, "autotune/strategy")
    if name is not None:
        return name
    timed = [name for name in STRATEGIES if f"lenbalance/autotune/{name}_s_per_ktok" in logs]
    return timed[0] if len(timed) == 1 else None


def _tuner_state(logs: Mapping[str, Any]) -> str:
    if not logs.get("lenbalance/autotune/exploring"):
        return ""
    done, total = logs.get("lenbalance/autotune/pass"), logs.get("lenbalance/autotune/passes_to_measure")
    return f" (exploring, pass {done:.0f} of {total:.0f})" if _finite(done) and _finite(total) else " (exploring)"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class StepLines(ProgressCallback):
    """Stock's progress bar; `on_log` writes `step_line` above it (main process only) where stock writes the whole
    logs dictionary. The end-of-training totals are left to the run's summary; other logs (evaluation) print as
    stock prints them."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (state.is_world_process_zero and self.training_bar is not None and logs):
            return
        if "loss" in logs:
            self.training_bar.write(step_line(logs, state.global_step, state.max_steps))
        elif "train_runtime" not in logs:
            super().on_log(args, state, control, logs=logs, **kwargs)


def use_step_lines(trainer) -> None:
    """Replace the trainer's stock `ProgressCallback` by `StepLines` (a trainer with `disable_tqdm` keeps its
    printer)."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(StepLines)


@contextmanager
def trl_deprecations_silenced() -> Iterator[None]:
    """Hide the `gradient_checkpointing*` FutureWarnings that transformers raises when TRL calls its old names
    (nothing a user can act on); every other warning shows as usual."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TRL_DEPRECATIONS, category=FutureWarning,
                                module=r"transformers\.modeling_utils")
        yield
