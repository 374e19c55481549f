"""What TRL logs does not depend on rl-lenbalance: its per-token metrics (entropy, clip ratios, KL) are means over
micro-batches, and regrouped rows are logged as stock's micro-batches of the same rows would log them (issue 32).
Compared against the stock GRPOTrainer: same seed, same data, float64 tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_args, prompt_dataset, train, varied_reward
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOTrainer
from trl.chat_template_utils import qwen3_chat_template

from rl_lenbalance import LenBalanceCallback, LenBalanceConfig, LenBalanceGRPOTrainer

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
    assert ours._lenbalance_loss.tuner.candidates == [plan]
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


class CounterEnvironment:
    """TRL's environment-test shape: one tool, and a reward the environment owns (logged under its class name)."""

    def reset(self, **kwargs):
        self._counter = 0

    def increment(self, step: int) -> int:
        """
        Increment the internal counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The updated counter value.
        """
        self._counter += step
        return self._counter

    def get_reward(self) -> float:
        return float(self._counter)


def scripted_generate(tokenizer):
    """A `model.generate` stand-in as TRL's own tool tests patch in: first turns answer, by their row's position, a
    valid tool call, a call to an unknown tool or plain text; a turn after a tool result answers 'Done!'."""
    end = tokenizer.eos_token
    first = ['<tool_call>\n{"name": "increment", "arguments": {"step": 1}}\n</tool_call>' + end,
             '<tool_call>\n{"name": "decrement", "arguments": {"step": 2}}\n</tool_call>' + end,
             "I won't increment" + end]
    first = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in first]
    done = tokenizer("Done!" + end, add_special_tokens=False)["input_ids"]

    def generate(input_ids, **kwargs):
        after_tool = "<tool_response>" in tokenizer.decode(input_ids[0])
        rows = [done if after_tool else first[i % 3] for i in range(len(input_ids))]
        width = max(map(len, rows))
        rows = [row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows]
        return torch.cat([input_ids, torch.tensor(rows, device=input_ids.device)], dim=-1)

    return generate


def train_with_tools(model_dir, tmp_path, path: str, config: LenBalanceConfig | None = None, **args):
    """GRPO with `CounterEnvironment` on a float64 tiny model whose `generate` is scripted on the instance, as TRL's
    tests do: stock (`path` 'stock'), the swap-in trainer ('swap') or `LenBalanceCallback` on a stock one."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    tokenizer.chat_template = qwen3_chat_template  # a template TRL parses tool calls of
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    cls = LenBalanceGRPOTrainer if path == "swap" else GRPOTrainer
    extra = {"lenbalance_config": config} if path == "swap" else {}
    trainer = cls(model=model, processing_class=tokenizer, reward_funcs=varied_reward,
                  args=make_args(tmp_path / path, **args), train_dataset=prompt_dataset(),
                  environment_factory=CounterEnvironment, **extra)
    if path == "callback":
        trainer.add_callback(LenBalanceCallback(trainer, config))
    model.generate = scripted_generate(tokenizer)  # after the trainer is built, as `patch.object(trainer.model, ...)`
    trainer.train()
    return trainer


@pytest.mark.parametrize("path, plan, run", [
    ("swap", "auto", dict(logging_steps=1, gradient_accumulation_steps=1, max_steps=4)),
    ("callback", "sorted", dict(logging_steps=2, gradient_accumulation_steps=2, steps_per_generation=4, max_steps=4)),
])
def test_tool_environment_and_reward_metrics_read_as_stocks(family_model_dir, tmp_path, monkeypatch, path, plan, run):
    """Every key TRL logs, every logged step: the tool and environment metrics (which TRL appends in `_generate`),
    the rewards (the environment's own among them), the completions' lengths and the per-token metrics, with
    `logging_steps` 1 and 2 and with `steps_per_generation` > `gradient_accumulation_steps`."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    model_dir = family_model_dir("qwen2")
    run = dict(run, per_device_train_batch_size=3, num_generations=3, max_completion_length=24, temperature=1.0,
               learning_rate=1e-2, optim="sgd", max_grad_norm=0.0, bf16=False)
    config = LenBalanceConfig(training_plan=plan, predictor_steps_per_round=2, max_overhead=1.0)
    stock = train_with_tools(model_dir, tmp_path, "stock", **run)
    ours = train_with_tools(model_dir, tmp_path, path, config, **run)
    theirs, mine = stock.state.log_history, ours.state.log_history
    assert len(theirs) == len(mine) == 1 + run["max_steps"] // run["logging_steps"]
    assert theirs[0]["tools/call_frequency"] == pytest.approx(2 / 3)  # the scripted turns ran: a check of the check
    assert "rewards/CounterEnvironment/mean" in theirs[0]
    for a, b in zip(theirs, mine, strict=True):
        assert stock_keys(a) == stock_keys(b), stock_keys(a) ^ stock_keys(b)
        for key in stock_keys(a):  # float32 noise: regrouped rows' per-token outputs differ in their last bits
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (path, a["step"], key)
    assert [e._counter for e in ours.environments] == [e._counter for e in stock.environments]
    if plan != "auto":
        assert ours._lenbalance_loss.tuner.candidates == [plan]  # regrouped rows, not stock's micro-batches
