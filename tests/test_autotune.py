"""The loss-phase strategies and their run-time choice: the pure rule (timings in, choice out), and the real trainer
keeping a fast exact strategy, never a slowed one, and never refusing a TRL setting."""

from __future__ import annotations

import random
import time
from unittest.mock import patch

import pytest
from helpers import assert_same_update, train
from hypothesis import given, settings
from hypothesis import strategies as st
from trl import GRPOTrainer

from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer, ledger
from rl_lenbalance.generation.decode import compacted_generate
from rl_lenbalance.loss import STRATEGIES, exact_strategies, regrouping_blockers
from rl_lenbalance.schedule import Autotuner, decide

ALL = list(STRATEGIES)


def test_a_clear_win_beyond_margin_and_noise_replaces_stock():
    timings = {"stock": [1.00, 1.02, 0.98], "sorted": [0.80, 0.81, 0.79], "stock_trimmed": [0.95, 0.96, 0.94]}
    assert decide(timings, "stock", margin=0.03) == "sorted"


def test_a_win_within_the_margin_or_the_noise_keeps_stock():
    assert decide({"stock": [1.0, 1.0, 1.0], "sorted": [0.98, 0.98, 0.98]}, "stock", 0.03) == "stock"  # 2% < 3%
    noisy = {"stock": [1.0, 1.5, 0.6], "sorted": [0.9, 0.9, 0.9]}  # 11% faster, but stock's timings spread ±45%
    assert decide(noisy, "stock", 0.03) == "stock"


def test_the_choice_is_kept_unless_clearly_beaten_and_dropped_once_it_no_longer_beats_stock():
    timings = {"stock": [1.0, 1.0, 1.0], "sorted": [0.80, 0.80, 0.80], "sorted_uneven": [0.79, 0.79, 0.79]}
    assert decide(timings, "sorted", 0.03) == "sorted"  # 1% better: not a reason to switch
    timings["sorted"] = [1.01, 1.01, 1.01]  # lengths drifted: sorted is now slower than stock
    assert decide(timings, "sorted", 0.03) == "sorted_uneven"
    timings["sorted_uneven"] = [1.02, 1.02, 1.02]
    assert decide(timings, "sorted_uneven", 0.03) == "stock"


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000))
def test_noise_around_equal_speeds_never_moves_away_from_stock(seed):
    """Equally fast strategies whose timings scatter by ±1.4%: no two timings differ by the 3% margin (1.014/0.986 <
    1.03), so no draw may move the choice. (Wider noise can, by chance, put every stock sample 4% above a candidate's;
    the spread guard, tested above, makes that rare, not impossible.)"""
    rng = random.Random(seed)
    tuner = Autotuner(ALL, "sorted", samples=3, margin=0.03, recheck_every=5)
    for _ in range(40):
        strategy = tuner.next()
        tuner.record(strategy, 1.0 + rng.uniform(-0.014, 0.014))  # every strategy equally fast
    assert tuner.choice == "stock"


def test_the_tuner_warms_up_alternates_chooses_and_rechecks():
    speed = {"stock": 1.0, "stock_trimmed": 0.9, "sorted": 0.7, "sorted_uneven": 1.3}
    four = ["stock", "stock_trimmed", "sorted", "sorted_uneven"]
    tuner = Autotuner(four, "sorted", warmup=1, samples=2, margin=0.03, recheck_every=3)
    order = []
    for _ in range(1 + 8 + 6):
        strategy = tuner.next()
        order.append(strategy)
        tuner.record(strategy, speed[strategy])
    assert order[0] == "sorted"  # warm-up: the least padded strategy, untimed
    assert order[1:9] == four + four[::-1]  # each candidate twice, the order reversed every round
    assert tuner.choice == "sorted" and tuner.ratio_vs_stock() == pytest.approx(1.0 / 0.7)
    assert order[9:] == ["sorted", "sorted", "stock", "sorted", "sorted", "stock_trimmed"]  # one re-check every 3
    assert len(tuner.timings["stock"]) == 3


def test_a_pinned_strategy_is_the_choice_and_stays_it():
    tuner = Autotuner(["sorted"], "sorted", samples=2)
    assert tuner.choice == "sorted" and tuner.decided
    for _ in range(10):
        assert tuner.next() == "sorted"
        assert not tuner.record("sorted", 1.0)
    assert tuner.choice == "sorted" and tuner.ratio_vs_stock() is None  # stock never ran: no ratio to report


def test_strategies_that_regroup_rows_are_exact_only_without_per_microbatch_statistics():
    assert exact_strategies(regrouping_blockers("dapo")) == ALL
    assert exact_strategies(regrouping_blockers(None)) == ALL  # RLOO: a mean over sequences
    for blockers in (regrouping_blockers("bnpo"), regrouping_blockers("dapo", entropy_coef=0.01),
                     regrouping_blockers("dapo", use_adaptive_entropy=True),
                     regrouping_blockers("grpo", top_entropy_quantile=0.2),
                     regrouping_blockers("dapo", router_aux_loss=True)):
        assert len(blockers) == 1 and exact_strategies(blockers) == ["stock", "stock_trimmed"]


def test_auto_never_keeps_a_slowed_strategy_and_learns_what_stock_learns(eos_tiny_model_dir, tmp_path, monkeypatch):
    """`sorted` is made slow (a delay in each of its micro-steps): after one timed pass of every candidate the tuner
    keeps another one, `sorted` never runs again, and the parameters equal stock's."""
    passes: list[str] = []
    compute_loss = LenBalanceGRPOTrainer.compute_loss

    def slowed(self, *args, **kwargs):
        if self._lenbalance_loss.current.strategy == "sorted":
            time.sleep(1.0)
        if not passes or self._step % self.args.steps_per_generation == 0:
            passes.append(self._lenbalance_loss.current.strategy)
        return compute_loss(self, *args, **kwargs)

    monkeypatch.setattr(LenBalanceGRPOTrainer, "compute_loss", slowed)
    config = LenBalanceConfig(predictor_steps_per_round=2, autotune_samples=1, autotune_every=0)
    run = dict(max_steps=9, max_completion_length=24)
    ours = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, lenbalance=config, **run)
    stock = train(GRPOTrainer, eos_tiny_model_dir, tmp_path, **run)
    assert passes[:7] == ["sorted"] + ALL  # warm-up, then one timed pass of each candidate
    assert "sorted" not in passes[7:] and len(passes) == 9 and ours._lenbalance_loss.tuner.choice != "sorted"
    logged = {k for row in ours.state.log_history for k in row}
    assert {f"lenbalance/autotune/{name}_s_per_ktok" for name in ALL} <= logged
    choice = ours._lenbalance_loss.tuner.choice
    assert {f"lenbalance/autotune/choice/{choice}", "lenbalance/autotune/ratio_vs_stock"} <= logged
    assert_same_update(stock, ours)


@pytest.mark.parametrize("overrides", [{"loss_type": "bnpo"}, {"entropy_coef": 0.01}, {"top_entropy_quantile": 0.5},
                                       {"use_adaptive_entropy": True}])
def test_settings_with_per_microbatch_statistics_train_stock_micro_batches_trimmed(eos_tiny_model_dir, tmp_path,
                                                                                   overrides):
    """Once refused (TRL's own tests failed on them); now each trains exactly as stock, padding columns cut."""
    run = dict(max_steps=2, max_completion_length=24, **overrides)
    with pytest.warns(UserWarning, match="regrouping rows would change what is learned"):
        ours = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, **run)
    stock = train(GRPOTrainer, eos_tiny_model_dir, tmp_path, **run)
    assert set(ours._lenbalance_loss.tuner.candidates) == {"stock", "stock_trimmed"}
    assert ours.lenbalance_totals.loss_tokens < ours.lenbalance_totals.loss_tokens_stock  # columns were cut
    assert_same_update(stock, ours)


def test_past_the_budget_compaction_still_drops_finished_rows_without_hooks(eos_tiny_model_dir, tmp_path):
    """Compaction reads no prediction: an uncaptured round still decodes through the compacting loop, with no
    hooks to follow its rows (`on_compact` unset), and only the first round was captured."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["on_compact"])
        return compacted_generate(*args, **kwargs)

    config = LenBalanceConfig(max_overhead=1e-9, compaction=True, training_plan="sorted")
    with patch("rl_lenbalance.integrations.trl.generation.compacted_generate", spy):
        ours = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, lenbalance=config, max_steps=3,
                     max_completion_length=24)
    assert ours.lenbalance.rounds == 1 and len(calls) == 3
    assert calls[0] is not None and calls[1:] == [None, None]
    rounds = [row for row in ours.state.log_history if "lenbalance/gen/decode_slots" in row]
    assert len(rounds) == 3  # the uncaptured rounds are in the ledger too: one slot per token, none on padding
    assert all(r["lenbalance/gen/decode_slots"] == r["lenbalance/gen/real_tokens"] for r in rounds[1:])
    assert any(r["lenbalance/gen/decode_slots_stock"] > r["lenbalance/gen/decode_slots"] for r in rounds[1:])
    assert ours.lenbalance_totals.decode_slots == sum(r["lenbalance/gen/decode_slots"] for r in rounds)


def test_an_inexact_training_plan_falls_back_to_stock_trimmed_with_a_note(eos_tiny_model_dir, tmp_path):
    with pytest.warns(UserWarning, match=r"training_plan='sorted' regroups rows.*loss_type='bnpo'.*'stock_trimmed'"):
        ours = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, loss_type="bnpo", max_steps=1,
                     lenbalance=LenBalanceConfig(training_plan="sorted", predictor_steps_per_round=2))
    assert ours._lenbalance_loss.tuner.candidates == ["stock_trimmed"]


def test_a_tiny_overhead_budget_captures_only_some_rounds_and_still_trains_the_head(eos_tiny_model_dir, tmp_path):
    """Nothing reads the predictions on the plain `generate` path: past the budget, rounds generate as stock without
    hooks; the head learned from the captured round, and the metrics say how many rounds were captured."""
    config = LenBalanceConfig(predictor_steps_per_round=2, max_overhead=1e-9, training_plan="sorted")
    ours = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, lenbalance=config, max_steps=3,
                 max_completion_length=24)
    assert ours.lenbalance.rounds == 1 and ours.lenbalance.trainer.buffer.size > 0  # the first round, learned from
    captured = [row["lenbalance/predictor/captured_rounds"] for row in ours.state.log_history
                if "lenbalance/predictor/captured_rounds" in row]
    assert captured == [1.0, 1.0, 1.0]
    uncaptured = [row["lenbalance/predictor/uncaptured_rounds"] for row in ours.state.log_history
                  if "lenbalance/predictor/uncaptured_rounds" in row]
    assert uncaptured == [0.0, 1.0, 2.0] and ours.lenbalance_totals.uncaptured_rounds == 2
    share = [row["lenbalance/predictor/overhead_frac_run"] for row in ours.state.log_history
             if "lenbalance/predictor/overhead_frac_run" in row]
    assert share[0] > 0 and share[-1] < share[0]  # the share falls as uncaptured generation time accrues
    generous = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, max_steps=3, max_completion_length=24,
                     lenbalance=LenBalanceConfig(predictor_steps_per_round=2, max_overhead=1.0))
    assert generous.lenbalance.rounds == 3


def test_a_log_over_several_steps_names_the_last_passs_plan_not_a_mean_of_indices(eos_tiny_model_dir, tmp_path):
    """TRL averages its metric store over a log's steps: with logging_steps=2 the 0/1 plan keys of passes 'sorted'
    and 'stock' would read 0.5 each, naming no plan. The log keeps the last pass's plan."""
    config = LenBalanceConfig(predictor_steps_per_round=2)  # 'auto': warm-up pass 'sorted', then 'stock' first
    ours = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, lenbalance=config, max_steps=2,
                 logging_steps=2, max_completion_length=16)
    (row,) = [row for row in ours.state.log_history if "lenbalance/autotune/strategy/stock" in row]
    assert ours._lenbalance_loss.tuner.candidates[0] == "stock" and ours._lenbalance_loss.tuner.first == "sorted"
    assert {name: row[f"lenbalance/autotune/strategy/{name}"] for name in STRATEGIES} == {
        name: float(name == "stock") for name in STRATEGIES}  # pass 2's, not a mean of passes 1 and 2
    assert ledger.logged_name(row, "autotune/strategy") == "stock" and "lenbalance/autotune/strategy" not in row
    assert row["lenbalance/autotune/pass"] == 2.0 and row["lenbalance/autotune/exploring"] == 1.0
