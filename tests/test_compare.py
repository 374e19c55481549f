"""`rl-lenbalance compare`: trainers take turns one optimizer step at a time, each on its own RNG stream."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

from rl_lenbalance.compare import Turnstile, _rng_state, compare_recipe

QUICKSTART = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"


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


def test_compare_recipe_times_stock_and_lenbalance_on_the_same_rollouts(eos_tiny_model_dir, tmp_path):
    overrides = {"model": {"name_or_path": str(eos_tiny_model_dir)}, "output_dir": str(tmp_path),
                 "lenbalance": {"compaction": False},  # the quickstart's compaction would draw other tokens
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
    assert ours["loss_pad_frac"] <= stock["loss_pad_frac"]
    assert ours["speedup_whole_step_s"] == stock["whole_step_s_median"] / ours["whole_step_s_median"]
    saved = json.loads((tmp_path / "lenbalance_compare.json").read_text())
    assert [r["variant"] for r in saved["results"]] == ["stock", "lenbalance"]
