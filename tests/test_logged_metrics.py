"""What TRL logs does not depend on the training plan: its per-token metrics (entropy, clip ratios, KL) are means over
micro-batches, and regrouped rows are logged as stock's micro-batches of the same rows would log them (issue 32).
Compared against the stock GRPOTrainer: same seed, same data, float64 tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import train
from trl import GRPOTrainer

from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer

WALL_CLOCK = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
# two passes over each batch, a loose clip range and a KL term: the clip ratios and `kl` are not all zero
RUN = dict(max_steps=2, max_completion_length=24, num_iterations=2, epsilon=1e-3, beta=0.04, loss_type="grpo")


@pytest.fixture(scope="module")
def stock(eos_tiny_model_dir, tmp_path_factory):
    return train(GRPOTrainer, eos_tiny_model_dir, tmp_path_factory.mktemp("stock"), **RUN)


def stock_keys(row):
    return {k for k in row if k not in WALL_CLOCK and not k.startswith("lenbalance/")}


@pytest.mark.parametrize("plan", ["sorted", "sorted_uneven", "packed"])
def test_every_metric_stock_logs_is_logged_as_stock_computes_it(stock, eos_tiny_model_dir, tmp_path, plan):
    ours = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, **RUN,
                 lenbalance=LenBalanceConfig(training_plan=plan, predictor_steps_per_round=2))
    assert ours._autotune.candidates == [plan]
    theirs, mine = stock.state.log_history, ours.state.log_history
    assert len(theirs) == len(mine)
    for a, b in zip(theirs, mine, strict=True):
        assert stock_keys(a) <= set(b), stock_keys(a) - set(b)
        for key in stock_keys(a):  # the update's float64 reordering error reaches ~1e-8 (`assert_same_update`)
            rel = 1e-6 if key in ("loss", "grad_norm", "train_loss") else 1e-9
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-12), (plan, a["step"], key)
    logged = [row for row in mine if "loss" in row]
    assert any(row["clip_ratio/region_mean"] > 0 for row in logged)  # the clip metrics measured something
    # the rows really were regrouped: trimmed micro-batches of other rows than stock's
    assert all(row["lenbalance/train/pad_frac"] < row["lenbalance/train/pad_frac_stock"] for row in logged)


@pytest.mark.slow
def test_rows_moved_between_two_ranks_are_logged_as_stock_logs_them(tiny_model_dir, tmp_path):
    """Two real gloo processes, GRPO and RLOO: rows trained on the other rank are scored back on their own, and
    TRL's gathers, nanmin / nanmax and num_iterations give stock's numbers."""
    out = tmp_path / "metrics.json"
    worker = Path(__file__).parent / "distributed" / "metrics_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker), str(tiny_model_dir),
           str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert [(r["loss_type"], r["plan"]) for r in results] == [("grpo", "sorted_uneven"), ("dapo", "packed"),
                                                               ("rloo", "sorted_uneven")]
    for r in results:
        assert r["world_size"] == 2 and r["rows_moved"] > 0 and r["clipped"] > 0, r
        assert {"entropy", "clip_ratio/low_min", "clip_ratio/high_max", "clip_ratio/region_mean"} <= r["diff"].keys()
        # a GRPO/RLOO loss is ~0 (normalised advantages): its float error is not relative (the update's equality is
        # `test_exactness_distributed`'s)
        worst = {key: d for key, d in r["diff"].items()
                 if key not in ("loss", "train_loss") and d > (1e-6 if key == "grad_norm" else 1e-9)}
        assert not worst, (r["loss_type"], r["plan"], worst)
