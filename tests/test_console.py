"""What `rl-lenbalance train` prints while it trains: one compact line per logged step, no metrics dictionary, and
no deprecation warnings from TRL's calls into transformers (rl_lenbalance/cli/console.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

from rl_lenbalance.cli.console import plan_name, step_line, trl_deprecations_silenced
from rl_lenbalance.ledger import GENERATION_PLANS, named
from rl_lenbalance.loss import STRATEGIES

NAMES = list(STRATEGIES)


def _logged(key: str, names, chosen: str) -> dict:
    return {f"lenbalance/{name}": value for name, value in named(key, names, chosen).items()}


def test_a_step_line_shows_seconds_padding_plan_tuner_state_and_reward():
    logs = {"loss": 0.0, "step_time": 3.912, "lenbalance/train/pad_frac": 0.074,
            "lenbalance/train/pad_frac_stock": 0.094,
            **_logged("autotune/strategy", NAMES, "sorted"), "lenbalance/autotune/exploring": 1.0,
            "lenbalance/autotune/pass": 2.0, "lenbalance/autotune/passes_to_measure": 4.0, "reward": 0.125,
            "entropy": 1.88, "completions/mean_length": 40.0}
    assert step_line(logs, 2, 4) == ("step 2/4 · 3.91 s · loss padding 7.4% (stock 9.4%) · plan sorted "
                                     "(exploring, pass 2 of 4) · reward 0.125")
    chosen = logs | {"lenbalance/autotune/exploring": 0.0}
    assert "plan sorted · " in step_line(chosen, 2, 4)
    measuring = chosen | _logged("gen/plan", GENERATION_PLANS, "stock") | {"lenbalance/gen/exploring": 1.0}
    assert " · generation stock (exploring) · " in step_line(measuring, 2, 4)
    compacting = chosen | _logged("gen/plan", GENERATION_PLANS, "compaction") | {"lenbalance/gen/exploring": 0.0}
    assert "plan sorted · generation compaction · reward" in step_line(compacting, 2, 4)
    stock = chosen | _logged("gen/plan", GENERATION_PLANS, "stock") | {"lenbalance/gen/exploring": 0.0}  # no word
    assert "generation" not in step_line(stock, 2, 4)


def test_a_figure_not_logged_is_left_out():
    assert step_line({"loss": 0.0, "reward": float("nan")}, 3, -1) == "step 3"
    timed = {f"lenbalance/autotune/{NAMES[1]}_s_per_ktok": 2.0}  # no plan logged: the one plan timed this step
    assert plan_name(timed) == NAMES[1]
    two = timed | {f"lenbalance/autotune/{NAMES[0]}_s_per_ktok": 2.0}  # passes of two plans in one log: no name
    assert plan_name(two) is None
    averaged = _logged("autotune/strategy", NAMES, "sorted") | {"lenbalance/autotune/strategy/sorted": 0.5,
                                                                "lenbalance/autotune/strategy/stock": 0.5}
    assert plan_name(averaged) is None  # a mean of two passes' plans names no plan


def test_only_transformers_own_checkpointing_deprecations_are_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with trl_deprecations_silenced():
            for name in ("is_gradient_checkpointing", "gradient_checkpointing_disable",
                         "gradient_checkpointing_enable"):
                warnings.warn_explicit(f"`{name}` is deprecated and will be removed in v6.", FutureWarning,
                                       "modeling_utils.py", 1, module="transformers.modeling_utils")
            warnings.warn_explicit("`other` is deprecated and will be removed in v6.", FutureWarning,
                                   "modeling_utils.py", 1, module="transformers.modeling_utils")
            warnings.warn("`gradient_checkpointing_enable` is deprecated", FutureWarning)  # this module's own
    assert [str(w.message).split()[0] for w in caught] == ["`other`", "`gradient_checkpointing_enable`"]


def test_the_cli_prints_one_compact_line_per_step_and_no_metrics_dict_or_checkpointing_warning(tiny_model_dir,
                                                                                             tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"model:\n  name_or_path: {tiny_model_dir}\n  dtype: float32\ntask:\n  num_prompts: 16\n"
                      f"output_dir: {tmp_path / 'out'}\nuse_cpu: true\nmax_steps: 2\nper_device_train_batch_size: 4\n"
                      "gradient_accumulation_steps: 2\nnum_generations: 4\nmax_completion_length: 16\n"
                      "logging_steps: 1\nsave_strategy: 'no'\nreport_to: none\nseed: 0\n")
    env = {**os.environ, "WANDB_DIR": str(tmp_path), "PYTHONWARNINGS": ""}
    proc = subprocess.run([sys.executable, "-m", "rl_lenbalance.cli.main", "train", str(recipe)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).replace("\r", "\n").splitlines()
    assert not [line for line in lines if re.search(r"\{'[\w/]+': ", line)], proc.stdout  # no logs dict
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(" · ")[0] for line in steps] == ["step 1/2", "step 2/2"], steps
    assert all(re.search(rf" · plan ({'|'.join(NAMES)})\b", line) for line in steps), steps
    assert all("loss padding" in line and " s · " in line and "reward" in line for line in steps), steps
    assert not [line for line in lines if "FutureWarning" in line or "checkpointing" in line], proc.stderr
