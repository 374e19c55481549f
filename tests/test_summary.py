"""The one run summary (`ledger.summary`): from run totals or from logged metrics, its seconds and training plan."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from rich.console import Console

from rl_lenbalance.cli.train import print_summary
from rl_lenbalance.ledger import (
    GENERATION_PLANS,
    LEGACY_STRATEGIES,
    GenerationLedger,
    RunTotals,
    TrainingLedger,
    logged_totals,
    named,
    round_metrics,
    summary,
    summary_json,
    summary_rows,
    time_metrics,
    training_metrics,
    wandb_summary,
    waste,
)
from rl_lenbalance.loss import STRATEGIES

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
    assert labels == ["steps", "predictor MAE at t=0, last round"]  # no seconds, padding or plan rows


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


def test_the_training_plan_is_shown_by_name_when_chosen_and_omitted_when_absent():
    names = ["stock", "sorted_budget"]  # any strategy's name: the logs hold no registry order
    logged = [_prefixed(named("autotune/choice", names, "stock")),
              _prefixed(named("autotune/choice", names, "sorted_budget")) | {"lenbalance/autotune/ratio_vs_stock": 1.5}]
    result = summary(RunTotals(), logged, steps=2)
    assert (result["autotune_choice"], result["autotune_ratio_vs_stock"]) == ("sorted_budget", 1.5)
    assert ("training plan", "sorted_budget (1.50× stock)", "") in summary_rows(result)
    before_names = [{"lenbalance/autotune/choice": 0.0}, {"lenbalance/autotune/choice": 1.0}]  # a run logged by index
    assert summary(RunTotals(), before_names, steps=2)["autotune_choice"] == "stock_trimmed"  # LEGACY_STRATEGIES
    assert summary(RunTotals(), [{"lenbalance/autotune/choice": "packed"}], steps=1)["autotune_choice"] == "packed"
    averaged = [_prefixed(named("autotune/choice", names, "stock")) | {"lenbalance/autotune/choice/stock": 0.5}]
    assert "autotune_choice" not in summary(RunTotals(), averaged, steps=1)  # a mean of two choices names none
    assert ("training plan", "packed", "") in summary_rows({"steps": 1, "autotune_choice": "packed"})  # a plain string
    absent = summary(RunTotals(), [{"lenbalance/predictor/mae_static": 3.0}], steps=1)
    assert "autotune_choice" not in absent and "autotune_state" not in absent and "plan_by_step" not in absent
    assert not any(label.startswith(("training plan", "plan of each step")) for label, *_ in summary_rows(absent))


def _prefixed(metrics: dict) -> dict:
    return {f"lenbalance/{key}": value for key, value in metrics.items()}


def _tuned(strategies: list[str], chosen: str | None = None, by_index: bool = False) -> list[dict]:
    """Log rows of steps that ran `strategies` as the adapter logs them (one 0/1 key per name; `by_index`: as a run
    logged before names, an index into `LEGACY_STRATEGIES`), the last step with a choice when `chosen`."""

    def plan(key: str, name: str) -> dict:
        return ({f"lenbalance/{key}": float(LEGACY_STRATEGIES.index(name))} if by_index
                else _prefixed(named(key, STRATEGIES, name)))

    rows = [{"step": float(step), "lenbalance/autotune/exploring": 1.0, "lenbalance/autotune/pass": float(step),
             "lenbalance/autotune/passes_to_measure": 10.0} | plan("autotune/strategy", name)
            for step, name in enumerate(strategies, start=1)]
    if chosen:
        rows[-1] |= plan("autotune/choice", chosen) | {"lenbalance/autotune/ratio_vs_stock": 1.31}
    return rows


@pytest.mark.parametrize("by_index", [False, True], ids=["by_name", "logged_before_names"])
def test_the_summary_names_every_steps_plan_and_says_the_tuner_is_still_measuring(by_index):
    result = summary(RunTotals(), _tuned(["sorted", "stock", "stock_trimmed", "sorted"], by_index=by_index), steps=4)
    assert result["plan_by_step"] == {"1": "sorted", "2": "stock", "3": "stock_trimmed", "4": "sorted"}
    assert (result["autotune_state"], result["autotune_pass"], result["autotune_passes_to_measure"]) == (
        "measuring", 4, 10)
    rows = {label: now for label, now, _ in summary_rows(result)}
    assert rows["training plan"] == "measuring: pass 4 of 10, no choice yet"
    assert rows["plan of each step"] == "1 sorted, 2 stock, 3 stock_trimmed, 4 sorted"
    chosen = summary(RunTotals(), _tuned(["sorted", "stock", "stock", "sorted"], chosen="sorted"), steps=4)
    assert chosen["autotune_state"] == "chosen" and "autotune_pass" not in chosen
    rows = {label: now for label, now, _ in summary_rows(chosen)}
    assert (rows["training plan"] == "sorted (1.31× stock)"
            and rows["plan of each step"] == "1 sorted, 2-3 stock, 4 sorted")
    long_run = summary(RunTotals(), _tuned(["stock", "sorted"] * 10), steps=20)
    assert {label: now for label, now, _ in summary_rows(long_run)}["plan of each step"] == (
        "stock: 10 steps, sorted: 10 steps")
    assert not any("plan #" in str(value) for value in [*result.values(), *chosen.values()])


def _captured_once(steps: int) -> list[dict]:
    """Log rows of a run whose capture stopped after round 1 (the budget), as the adapter logs them."""
    rows = [{"step": float(step), "lenbalance/predictor/captured_rounds": 1.0,
             "lenbalance/predictor/uncaptured_rounds": float(step - 1),
             "lenbalance/predictor/overhead_frac": 0.044 if step == 1 else 0.0} for step in range(1, steps + 1)]
    rows[0] |= {"lenbalance/predictor/mae_static": 57.4, "lenbalance/predictor/mae_naive_static": 64.0,
                "lenbalance/predictor/mae_plp32": 47.8, "lenbalance/predictor/mae_naive_plp32": 48.0}
    return rows


def test_predictor_figures_name_their_round_and_sit_beside_the_naive_estimate():
    result = summary(RunTotals(), _captured_once(4), steps=4)
    assert (result["predictor_round"], result["predictor_step"], result["captured_rounds"]) == (1, 1.0, 1)
    rows = {label: (now, naive) for label, now, naive in summary_rows(result)}
    assert rows["predictor MAE at t=0, round 1 of 1 captured (step 1, before online training)"] == (
        "57.4 tok", "naive 64.0 tok")
    assert rows["predictor MAE at t=32, round 1 of 1 captured (step 1, before online training)"] == (
        "47.8 tok", "naive 48.0 tok")
    assert rows["rounds the predictor captured"] == ("1 in 4 steps", "")
    why = rows["why capture stopped"][0]
    assert "after round 1" in why and "lenbalance.max_overhead" in why and "nothing on this path reads" in why
    assert "3 rounds ran without capture" in why
    every = summary(RunTotals(), _captured_once(1), steps=1)  # one step, one round: nothing stopped
    assert "capture_stopped" not in every
    # fewer rounds than steps by design (steps_per_generation > gradient_accumulation_steps), every round captured
    by_design = [row | {"lenbalance/predictor/uncaptured_rounds": 0.0} for row in _captured_once(4)]
    assert "capture_stopped" not in summary(RunTotals(), by_design, steps=4)
    assert not any(label == "why capture stopped" for label, *_ in summary_rows(every))


def test_the_summary_json_is_strict_and_the_wandb_summary_keeps_what_was_measured():
    result = summary(RunTotals(), _captured_once(4) + _tuned(["sorted"]), steps=4, wall_s=math.inf)
    assert math.isnan(result["loss_pad_frac"]) and math.isinf(result["wall_s"])

    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    parsed = json.loads(summary_json(result), parse_constant=refuse)
    assert parsed["loss_pad_frac"] is None and parsed["wall_s"] is None and parsed["mae_static"] == 57.4
    assert parsed["plan_by_step"] == {"1": "sorted"}
    stored = wandb_summary(result)
    assert stored["lenbalance/mae_static"] == 57.4 and stored["lenbalance/autotune_state"] == "measuring"
    assert "lenbalance/loss_pad_frac" not in stored and "lenbalance/wall_s" not in stored


def test_the_summary_table_fits_an_80_column_terminal():
    totals, rows = _trained()
    console = Console(width=80, record=True)
    print_summary(summary(totals, rows + [{"lenbalance/autotune/choice": "sorted"}], steps=2, wall_s=9.0), console)
    text = console.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    assert "2.50 s/step (5.0 s)" in text and "training plan" in text and "rl-lenbalance compare" in text


def test_the_generation_tuner_times_a_round_per_decode_step_of_stock_without_the_hooks():
    """The slowest rank's seconds less its hooks', over the longest completion of any rank."""
    from rl_lenbalance.ledger import seconds_per_decode_step

    fast, slow = STEPS[0][0], dataclasses.replace(STEPS[1][0], seconds=3.0, hook_seconds=0.5)
    assert seconds_per_decode_step([fast]) == pytest.approx((2.0 - 0.2) / 40)
    assert seconds_per_decode_step([fast, slow]) == pytest.approx((3.0 - 0.5) / 60)


def test_the_generation_plan_is_named_with_its_ratio_or_as_measuring():
    from rl_lenbalance.ledger import generation_plan

    def plans(ran: str, chosen: str | None = None) -> dict:
        return _prefixed(named("gen/plan", GENERATION_PLANS, ran)
                         | (named("gen/choice", GENERATION_PLANS, chosen) if chosen else {})) | {"step": 1}

    measuring = summary(RunTotals(), [plans("stock") | {"lenbalance/gen/exploring": 1.0}], 1)
    assert measuring["generation_plan"] == "measuring" and generation_plan(measuring) == "measuring, no choice yet"
    chosen = summary(RunTotals(), [plans("compaction", "compaction") | {"lenbalance/gen/ratio_vs_stock": 1.25}], 1)
    assert (chosen["generation_plan"], chosen["generation_plan_ratio_vs_stock"]) == ("compaction", 1.25)
    assert ("generation plan", "compaction (1.25× stock)", "") in summary_rows(chosen)
    pinned = summary(RunTotals(), [plans("stock", "stock")], 1)
    assert generation_plan(pinned) == "stock" and math.isnan(pinned["generation_plan_ratio_vs_stock"])
    before_names = [{"step": 1, "lenbalance/gen/plan": 1.0, "lenbalance/gen/choice": 1.0}]  # a run logged by index
    assert summary(RunTotals(), before_names, 1)["generation_plan"] == "compaction"
    assert "generation_plan" not in summary(RunTotals(), [{"step": 1}], 1)  # nothing logged (vLLM): no entry
