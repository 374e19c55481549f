"""`rl-lenbalance compare`: trainers take turns one optimizer step at a time, each in a process of its own."""

from __future__ import annotations

import functools
import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from helpers import QUICKSTART
from rich.console import Console

from rl_lenbalance.cli.compare import CompareError, Turn, Turnstile, add_ratios, compare_recipe, print_comparison


def _fake_trainer(steps: int, folder: Path, turn: Turn, *, fail_at: int = 0, hang_at: int = 0) -> list[float]:
    """A fake variant (its process's job): `steps` turns, each drawing from torch's RNG and leaving a file named
    after its process and step in `folder`; raises at step `fail_at`, hangs at step `hang_at`."""
    name = multiprocessing.current_process().name.removeprefix("compare-")
    torch.manual_seed(7)
    draws = []
    for step in range(1, steps + 1):
        (folder / f"{name}{step}").write_text(str(time.monotonic()))
        if step == fail_at:
            raise ValueError("boom")
        if step == hang_at:
            time.sleep(600)
        draws.append(torch.rand(1).item())
        turn.give_back()
    return draws


def _turn_order(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.iterdir()), key=lambda name: float((folder / name).read_text()))


def test_turnstile_alternates_the_order_every_round_in_processes_of_their_own(tmp_path):
    job = functools.partial(_fake_trainer, 3, tmp_path)
    results = Turnstile(["a", "b"]).run({"a": job, "b": job})
    assert _turn_order(tmp_path) == ["a1", "b1", "b2", "a2", "a3", "b3"]
    torch.manual_seed(7)
    assert results["a"] == results["b"] == [torch.rand(1).item() for _ in range(3)]  # as if each ran alone
    assert not multiprocessing.active_children()


def test_a_variant_that_raises_ends_the_comparison_at_once_naming_it_and_its_step(tmp_path):
    jobs = {"a": functools.partial(_fake_trainer, 5, tmp_path),
            "b": functools.partial(_fake_trainer, 5, tmp_path, fail_at=2)}
    with pytest.raises(CompareError, match=r"^variant 'b' failed in step 2: ValueError: boom$") as error:
        Turnstile(["a", "b"]).run(jobs)
    assert "in _fake_trainer" in error.value.details and error.value.details.rstrip().endswith("ValueError: boom")
    assert _turn_order(tmp_path) == ["a1", "b1", "b2"]  # order a b, then b a: "a" never ran its step 2
    assert not multiprocessing.active_children()


def test_a_variant_that_hangs_ends_the_comparison_after_the_turn_timeout(tmp_path):
    jobs = {"a": functools.partial(_fake_trainer, 3, tmp_path),
            "b": functools.partial(_fake_trainer, 3, tmp_path, hang_at=1)}
    with pytest.raises(CompareError, match=r"variant 'b' did not finish step 1 within turn_timeout_s=0.5 s"):
        Turnstile(["a", "b"], turn_timeout_s=0.5).run(jobs)
    assert _turn_order(tmp_path) == ["a1", "b1"]
    assert not multiprocessing.active_children()  # the hung process was killed


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
    for shown in ("stock", "lenbalance", "243.40", "1234.50", "25.0%", "1.20×", "generation phase", "below 0",
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
        # the step holds its generation
        assert result["page_faults_median"] >= result["generation_page_faults_median"] >= 0
        # each variant's own process, under the allocator settings it ran with (conftest names glibc's)
        assert result["peak_resident_mb"] > 100 and result["malloc"] == "MALLOC_TRIM_THRESHOLD_=131072"
    assert ours["completion_tokens"] == stock["completion_tokens"]  # same draws: the same work was timed
    assert ours["generation_plan"] == "measuring"  # 3 rounds: the generation tuner has not chosen yet
    assert ours["loss_pad_frac"] <= stock["loss_pad_frac"]
    assert ours["speedup_whole_step_s"] == stock["whole_step_s_median"] / ours["whole_step_s_median"]
    saved = json.loads((tmp_path / "lenbalance_compare.json").read_text())
    assert [r["variant"] for r in saved["results"]] == ["stock", "lenbalance"]
