"""`rl-lenbalance compare`: trainers take turns one optimizer step at a time, each on its own RNG stream."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from rich.console import Console

from rl_lenbalance.compare import CompareError, Turnstile, _rng_state, add_ratios, compare_recipe, print_comparison

from helpers import QUICKSTART


def test_turnstile_alternates_the_order_every_round_and_isolates_rng_streams():
    turnstile = Turnstile(["a", "b"])
    seen: list[tuple[str, float]] = []
    torch.manual_seed(7)
    turnstile.rng["a"] = turnstile.rng["b"] = _rng_state()

    def run(name: str) -> None:
        turnstile.acquire(name)
        for _ in range(3):
            seen.append((name, torch.rand(1).item()))  # what this trainer draws in its turn
            turnstile.release(name)
            turnstile.acquire(name)
        turnstile.release(name, finished=True)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert [name for name, _ in seen] == ["a", "b", "b", "a", "a", "b"]
    draws = {name: [x for n, x in seen if n == name] for name in ("a", "b")}
    torch.manual_seed(7)
    assert draws["a"] == draws["b"] == [torch.rand(1).item() for _ in range(3)]  # as if each ran alone


def _stepping(turnstile: Turnstile, name: str, steps: int, seen: list[str], step=lambda n: None):
    """A fake trainer: `steps` turns, each recorded in `seen` and running `step(n)`, as `_TakeTurns` drives one."""

    def job() -> None:
        turnstile.acquire(name)
        for n in range(1, steps + 1):
            seen.append(f"{name}{n}")
            step(n)
            turnstile.release(name)
            turnstile.acquire(name)

    return job


def _threads_end() -> bool:
    """Every fake's thread ended (a job waiting for its turn is stopped once another failed)."""
    threads = [t for t in threading.enumerate() if t.name.startswith("compare-")]
    for thread in threads:
        thread.join(timeout=10)
    return not any(thread.is_alive() for thread in threads)


def _turnstile(names: list[str], **kwargs) -> Turnstile:
    turnstile = Turnstile(names, **kwargs)
    turnstile.rng = {name: _rng_state() for name in names}
    return turnstile


def test_a_variant_that_raises_ends_the_comparison_at_once_naming_it_and_its_step():
    turnstile, seen = _turnstile(["a", "b"]), []

    def step(n: int) -> None:
        if n == 2:
            raise ValueError("boom")

    jobs = {"a": _stepping(turnstile, "a", 5, seen), "b": _stepping(turnstile, "b", 5, seen, step)}
    with pytest.raises(CompareError, match=r"variant 'b' failed in step 2: ValueError: boom") as error:
        turnstile.run(jobs)
    assert isinstance(error.value.__cause__, ValueError)
    assert seen == ["a1", "b1", "b2"]  # order a b, then b a: "a" never ran its step 2
    assert _threads_end()


def test_a_variant_that_hangs_ends_the_comparison_after_the_turn_timeout():
    turnstile, seen, hang = _turnstile(["a", "b"], turn_timeout_s=0.5), [], threading.Event()
    jobs = {"a": _stepping(turnstile, "a", 3, seen), "b": _stepping(turnstile, "b", 3, seen, lambda n: hang.wait())}
    start = time.monotonic()
    with pytest.raises(CompareError, match=r"variant 'b' did not finish step 1 within turn_timeout_s=0.5 s"):
        turnstile.run(jobs)
    assert 0.5 <= time.monotonic() - start < 10 and seen == ["a1", "b1"]
    hang.set()  # let the fake's daemon thread end
    assert _threads_end()


def test_the_comparison_table_fits_an_80_column_terminal():
    def result(name: str, seconds: float) -> dict:
        return {"variant": name, "steps": 6, "warmup_steps": 1, "whole_step_s_median": 2 * seconds,
                "generation_s_median": seconds, "loss_phase_s_median": seconds, "microstep_s_median": seconds / 10,
                "loss_pad_frac": 0.25, "whole_s_per_1k_completion_tokens": seconds}

    results = [result("stock", 121.7), result("lenbalance", 101.2), result("lenbalance_generation_only", 1234.5)]
    add_ratios(results)
    results[1] |= {"autotune_choice": "sorted", "autotune_ratio_vs_stock": 1.25, "generation_plan": "compaction",
                   "generation_plan_ratio_vs_stock": 1.1}
    console = Console(width=80, record=True)
    print_comparison(results, console)
    text = console.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    for shown in ("stock", "lenbalance", "243.40", "1234.50", "25.0%", "1.20×", "generation phase",
                  "lenbalance: training plan: sorted (1.25× stock)",
                  "lenbalance: generation plan: compaction (1.10× stock)"):
        assert shown in text, shown


def test_compare_recipe_times_stock_and_lenbalance_on_the_same_rollouts(eos_tiny_model_dir, tmp_path):
    overrides = {"model": {"name_or_path": str(eos_tiny_model_dir)}, "output_dir": str(tmp_path),
                 # the recipe leaves compaction to 'auto': 3 rounds are too few for its choice (warm-up + 2 of each)
                 "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "num_generations": 4,
                 "max_completion_length": 24}
    results = compare_recipe(str(QUICKSTART), overrides, steps=3, warmup=1)
    stock, ours = results
    assert (stock["variant"], ours["variant"]) == ("stock", "lenbalance")
    for result in results:
        assert result["steps"] == 2 and len(result["whole_step_s_per_step"]) == 2
        assert all(w > g > 0 for w, g in zip(result["whole_step_s_per_step"], result["generation_s_per_step"]))
        assert result["microstep_s_median"] > 0 and result["nonfinite_grad_steps"] == 0
    assert ours["completion_tokens"] == stock["completion_tokens"]  # same draws: the same work was timed
    assert ours["generation_plan"] == "measuring"  # 3 rounds: the generation tuner has not chosen yet
    assert ours["loss_pad_frac"] <= stock["loss_pad_frac"]
    assert ours["speedup_whole_step_s"] == stock["whole_step_s_median"] / ours["whole_step_s_median"]
    saved = json.loads((tmp_path / "lenbalance_compare.json").read_text())
    assert [r["variant"] for r in saved["results"]] == ["stock", "lenbalance"]
