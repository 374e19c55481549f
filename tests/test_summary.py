"""The one run summary (`ledger.summary`): from run totals or from logged metrics, its seconds and training plan."""

from __future__ import annotations

import dataclasses
import math

import pytest
from rich.console import Console

from rl_lenbalance.ledger import (GenerationLedger, RunTotals, TrainingLedger, logged_totals, round_metrics, summary,
                                  summary_rows, time_metrics, training_metrics, waste)
from rl_lenbalance.train import print_summary

STEPS = [  # (generation ledger, predictor train seconds, training ledger, generation-phase s, loss-phase s)
    (GenerationLedger(100, 160, 40, 40, 90, 2.0, 0.2, 0, 0), 0.3, TrainingLedger(100, 200, 80, 0), 3.0, 1.5),
    (GenerationLedger(50, 120, 30, 60, 45, 1.0, 0.1, 12, 0), 0.1, TrainingLedger(90, 120, 60, 0), 2.0, 0.5),
]


def _trained() -> tuple[RunTotals, list[dict]]:
    """Two optimizer steps of one rank counted as the adapter counts them, and the rows it logs (log_history form)."""
    totals, previous, rows, seen = RunTotals(), RunTotals(), [], 0.0
    for step, (generation, train_s, training, generation_s, loss_s) in enumerate(STEPS, start=1):
        totals.add_generation([generation], train_s)
        totals.add_training([training], passes=1)
        totals.generation_phase_s += generation_s
        totals.loss_phase_s += loss_s
        seen += training.real_tokens  # TRL's cumulative num_tokens
        metrics = (round_metrics([generation], {"predictor/train_s": train_s}) | training_metrics([training])
                   | time_metrics(totals, previous))
        rows.append({"step": step, "num_tokens": seen, **{f"lenbalance/{k}": v for k, v in metrics.items()}})
        previous = dataclasses.replace(totals)
    return totals, rows


def test_time_metrics_are_the_phase_seconds_since_the_previous_log():
    totals, rows = _trained()
    assert [(r["lenbalance/time/generation_s"], r["lenbalance/time/loss_phase_s"]) for r in rows] == [(3.0, 1.5),
                                                                                                     (2.0, 0.5)]
    assert time_metrics(totals, RunTotals()) == {"time/generation_s": 5.0, "time/loss_phase_s": 2.0}
    assert time_metrics(totals, dataclasses.replace(totals)) == {"time/generation_s": 0.0, "time/loss_phase_s": 0.0}


def test_the_summary_rebuilt_from_logged_metrics_equals_the_one_from_run_totals():
    totals, rows = _trained()
    live, logged = summary(totals, rows, steps=2, wall_s=9.0), summary(logged_totals(rows), rows, steps=2, wall_s=9.0)
    for key in ("generation_phase_s", "loss_phase_s", "generation_s", "decode_slot_waste", "decode_slot_waste_stock",
                "decode_steps", "decode_steps_stock", "reprefill_tokens", "loss_pad_frac", "loss_pad_frac_stock",
                "loss_tokens_saved", "predictor_overhead_frac"):
        assert logged[key] == pytest.approx(live[key]), key
    assert live["loss_pad_frac"] == pytest.approx(waste(100 + 90, 80 + 60))
    assert live["predictor_overhead_frac"] == pytest.approx((0.2 + 0.3 + 0.1 + 0.1) / 3.0)
    assert summary_rows(live) == summary_rows(logged)


def test_wasted_is_nan_when_nothing_was_computed_and_such_rows_are_left_out():
    assert waste(200, 150) == 0.25 and math.isnan(waste(0, 0))
    nothing = logged_totals([{"step": 1, "lenbalance/predictor/mae_static": 4.0}])
    result = summary(nothing, [{"lenbalance/predictor/mae_static": 4.0}], steps=1)
    assert math.isnan(result["decode_slot_waste"]) and math.isnan(result["loss_pad_frac"])
    labels = [label for label, *_ in summary_rows(result)]
    assert labels == ["steps", "predictor MAE, prompt only (t=0), last round"]  # no seconds, padding or plan rows


def test_rows_show_seconds_per_step_and_in_all_next_to_each_phases_padding():
    totals, rows = _trained()
    table = summary_rows(summary(totals, rows, steps=2, wall_s=9.0))
    labels = [label for label, *_ in table]
    values = {label: (now, stock) for label, now, stock in table}
    assert values["whole step (wall time / steps)"] == ("4.50 s/step (9.0 s)", "")
    assert values["generation phase (rollouts, rewards), this rank"] == ("2.50 s/step (5.0 s)", "")
    assert values["loss phase (forward, backward), this rank"] == ("1.00 s/step (2.0 s)", "")
    assert labels.index("generation phase (rollouts, rewards), this rank") + 1 == labels.index(
        "decode slots wasted on padding")
    assert labels.index("loss phase (forward, backward), this rank") + 1 == labels.index(
        "loss-forward tokens that are padding")


def test_the_training_plan_is_shown_when_logged_by_name_or_index_and_omitted_when_absent():
    logged = [{"lenbalance/autotune/choice": 0.0}, {"lenbalance/autotune/choice": 1.0,
                                                     "lenbalance/autotune/ratio_vs_stock": 1.5}]
    result = summary(RunTotals(), logged, steps=2, plan_names=["stock", "sorted_budget"])
    assert (result["autotune_choice"], result["autotune_ratio_vs_stock"]) == ("sorted_budget", 1.5)
    assert ("training plan", "sorted_budget (1.50× stock)", "") in summary_rows(result)
    assert summary(RunTotals(), logged, steps=2)["autotune_choice"] == "plan #1"  # names unknown
    assert summary(RunTotals(), [{"lenbalance/autotune/choice": "packed"}], steps=1)["autotune_choice"] == "packed"
    assert ("training plan", "packed", "") in summary_rows({"steps": 1, "autotune_choice": "packed"})  # a plain string
    absent = summary(RunTotals(), [{"lenbalance/predictor/mae_static": 3.0}], steps=1)
    assert "autotune_choice" not in absent and "autotune_ratio_vs_stock" not in absent
    assert not any(label == "training plan" for label, *_ in summary_rows(absent))


def test_the_summary_table_fits_an_80_column_terminal():
    totals, rows = _trained()
    console = Console(width=80, record=True)
    print_summary(summary(totals, rows + [{"lenbalance/autotune/choice": "sorted"}], steps=2, wall_s=9.0), console)
    text = console.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    assert "2.50 s/step (5.0 s)" in text and "training plan" in text and "rl-lenbalance compare" in text
