"""`compaction: auto` in a real GRPOTrainer on a tiny local model: the trainer times its rounds with stock's
`generate` and with compaction and keeps the faster (with re-checks), and the completions stay stock's, greedy or
sampled; where torch would sample a smaller batch otherwise (`generation.exact_sampling`), it never compacts under
sampling."""

from __future__ import annotations

import json
import time

import helpers
import pytest
import torch
from helpers import train
from trl import GRPOTrainer

from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer, ledger
from rl_lenbalance.generation.decode import compacted_generate

SCORE = helpers.varied_reward
GREEDY = dict(generation_kwargs={"do_sample": False}, max_completion_length=24)


def logged(trainer, key: str) -> list[float]:
    return [row[f"lenbalance/{key}"] for row in trainer.state.log_history if f"lenbalance/{key}" in row]


def logged_names(trainer, key: str) -> list[str]:
    """The name each log row holds under `key` (`gen/plan`, `gen/choice`: one 0/1 key per name)."""
    return [name for row in trainer.state.log_history if (name := ledger.logged_name(row, key)) is not None]


def recording_rewards(monkeypatch) -> list[list[int]]:
    """Every completion scored from now on, in order (`helpers.train` rewards with `helpers.varied_reward`)."""
    seen: list[list[int]] = []
    score = SCORE

    def varied_reward(completion_ids, **kwargs):
        seen.extend(list(c) for c in completion_ids)
        return score(completion_ids, **kwargs)

    monkeypatch.setattr(helpers, "varied_reward", varied_reward)
    return seen


@pytest.mark.slow
def test_greedy_auto_times_both_plans_and_keeps_stocks_completions(embedded_dir, tmp_path, monkeypatch):
    """The real model (a random tiny one decodes every prompt greedily to the same length, so no row would leave
    the batch early)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["min_finished"])
        return compacted_generate(*args, **kwargs)

    expected = recording_rewards(monkeypatch)
    run = dict(max_steps=4, dtype=torch.float32, **GREEDY)
    train(GRPOTrainer, embedded_dir, tmp_path, **run)
    got = recording_rewards(monkeypatch)  # from here on, `expected` grows no more
    config = LenBalanceConfig(predictor_steps_per_round=2, autotune_samples=1)
    monkeypatch.setattr("rl_lenbalance.integrations.trl.generation.compacted_generate", spy)
    ours = train(LenBalanceGRPOTrainer, embedded_dir, tmp_path, lenbalance=config, **run)
    assert (ours.lenbalance_config.compaction == "auto"
            and ours._lenbalance_generation_tuner.candidates == ["stock", "compaction"])
    assert len({len(c) for c in expected}) >= 3, "greedy rows of one length would not exercise compaction"
    assert got == expected  # 4 rounds, stock's and compaction's: stock's completions token for token
    plans = logged_names(ours, "gen/plan")
    # round 1 warms up (stock, untimed), rounds 2-3 time stock and compaction, round 4 runs the choice
    assert plans[:3] == ["stock", "stock", "compaction"] and logged(ours, "gen/exploring") == [1.0, 1.0, 1.0, 0.0]
    assert calls.count(1) == plans.count("compaction") >= 1  # the compacting loop ran exactly in the compaction rounds
    assert (set(ours._lenbalance_generation_tuner.timings) == {"stock", "compaction"}
            and ours._lenbalance_generation_tuner.decided)
    ratio = logged(ours, "gen/ratio_vs_stock")  # once decided (rounds 3 and 4): stock's time over the choice's
    assert (len(ratio) == 2 and ratio[-1] == pytest.approx(ours._lenbalance_generation_tuner.ratio_vs_stock())
            and ratio[-1] > 0)
    assert len(logged(ours, "gen/s_per_step")) == 4 and all(s > 0 for s in logged(ours, "gen/s_per_step"))


@pytest.mark.parametrize("slow", ["compaction", "stock"])
def test_greedy_auto_keeps_the_faster_plan_and_rechecks_the_other(eos_tiny_model_dir, tmp_path, monkeypatch, slow):
    """One plan made slower by a sleep per round: after measuring both, auto keeps the other one, re-checks the slow
    one every `autotune_every` rounds (and keeps its choice), and the summary names it; the tuner's state survives a
    checkpoint's JSON."""
    def slower(function):
        def wrapped(*args, **kwargs):
            time.sleep(0.5)
            return function(*args, **kwargs)
        return wrapped

    if slow == "compaction":
        monkeypatch.setattr("rl_lenbalance.integrations.trl.generation.compacted_generate",
                            slower(compacted_generate))
    else:
        monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", slower(GRPOTrainer._generate_single_turn))
    config = LenBalanceConfig(predictor_steps_per_round=2, autotune_samples=1, autotune_every=2)
    ours = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, lenbalance=config, max_steps=5, **GREEDY)
    fast = "stock" if slow == "compaction" else "compaction"
    tuner = ours._lenbalance_generation_tuner
    assert tuner.choice == fast
    # warm-up, stock, compaction (measured), then the choice, then one re-check of the slow plan
    assert logged_names(ours, "gen/plan") == ["stock", "stock", "compaction", fast, slow]
    assert logged_names(ours, "gen/choice") == [fast] * 3
    ratio = logged(ours, "gen/ratio_vs_stock")[-1]
    assert (ratio == 1.0) if fast == "stock" else (ratio > 1.0)
    summary = ledger.summary(ours.lenbalance_totals, ours.state.log_history, 5)
    assert summary["generation_plan"] == fast and summary["generation_plan_ratio_vs_stock"] == ratio
    assert ("generation plan", ledger.generation_plan(summary), "") in ledger.summary_rows(summary)
    state = json.loads(json.dumps(ours.lenbalance_run_state()))
    resumed = helpers.make_trainer(LenBalanceGRPOTrainer, eos_tiny_model_dir, ours.args, lenbalance_config=config)
    resumed.load_lenbalance_run_state(state, "run_state.json")
    assert (resumed._lenbalance_generation_tuner.state_dict() == tuner.state_dict()
            and resumed._lenbalance_generation_tuner.next() == tuner.next())


def test_sampled_auto_times_both_plans_and_keeps_stocks_completions(eos_tiny_model_dir, tmp_path, monkeypatch):
    expected = recording_rewards(monkeypatch)
    run = dict(max_steps=4, max_completion_length=24)
    train(GRPOTrainer, eos_tiny_model_dir, tmp_path, **run)
    got = recording_rewards(monkeypatch)
    ours = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, **run,
                 lenbalance=LenBalanceConfig(predictor_steps_per_round=2, autotune_samples=1))
    assert (ours.lenbalance_config.compaction == "auto"
            and ours._lenbalance_generation_tuner.candidates == ["stock", "compaction"])
    assert len({len(c) for c in expected}) >= 3, "sampled rows of one length would not exercise compaction"
    assert logged_names(ours, "gen/plan")[:3] == ["stock", "stock", "compaction"]  # warm-up, then both timed
    assert got == expected  # sampled, with and without finished rows in the batch: stock's tokens


def test_where_torch_samples_otherwise_auto_never_compacts_under_sampling(eos_tiny_model_dir, tmp_path, monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return compacted_generate(*args, **kwargs)

    monkeypatch.setattr("rl_lenbalance.integrations.trl.trainer.exact_sampling", lambda device_type: False)
    monkeypatch.setattr("rl_lenbalance.integrations.trl.generation.compacted_generate", spy)
    ours = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, max_steps=3, max_completion_length=24,
                 lenbalance=LenBalanceConfig(predictor_steps_per_round=2, autotune_samples=1))
    assert ours.lenbalance_config.compaction is False and ours._lenbalance_generation_tuner.candidates == ["stock"]
    assert (calls == [] and logged_names(ours, "gen/plan") == ["stock"] * 3
            and logged(ours, "gen/exploring") == [0.0] * 3)
    assert logged(ours, "gen/ratio_vs_stock") == []  # one plan: nothing compared
    assert ledger.summary(ours.lenbalance_totals, ours.state.log_history, 3)["generation_plan"] == "stock"
