"""Stock TRL against rl-lenbalance as a user runs them: each trainer alone in the main thread, one after the other,
in ABBA order (stock, lenbalance, lenbalance, stock), each block a fresh trainer from the recipe trained `--steps`
steps; the first step of every block is warm-up. Medians over the remaining steps, with ratios against stock.

`rl-lenbalance compare` alternates the trainers step by step, each in a process of its own; this script runs each
alone, in blocks, with no other trainer's process alive beside it.

    cd benchmarks && python step_time_sequential.py ../recipes/quickstart.yaml --steps 4 \
        --set output_dir=/tmp/seq_chosen lenbalance.compaction=true lenbalance.training_plan=shared_prompt \
        --out ../docs/benchmarks/step_time_sequential_chosen_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from _common import save_report  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rl_lenbalance.cli.compare import StepClock, timed  # noqa: E402
from rl_lenbalance.cli.recipe import load_recipe  # noqa: E402
from rl_lenbalance.cli.train import build_trainer, parse_overrides  # noqa: E402
from rl_lenbalance.integrations import LenBalanceGRPOTrainer  # noqa: E402

ORDER = ("stock", "lenbalance", "lenbalance", "stock")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--steps", type=int, default=4, help="Steps per block, the warm-up step included.")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Recipe overrides, as for train.")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    fixed = {"max_steps": args.steps, "save_strategy": "no", "report_to": "none", "disable_tqdm": True}
    overrides = parse_overrides(args.set)
    recipe = load_recipe(args.recipe, overrides | fixed)
    steps: dict[str, list[dict]] = {"stock": [], "lenbalance": []}
    for block, name in enumerate(ORDER):
        trainer = build_trainer(recipe, timed(GRPOTrainer if name == "stock" else LenBalanceGRPOTrainer))
        trainer.add_callback(StepClock(trainer))
        trainer.train()
        steps[name] += [{"block": block, "whole_step_s": r.whole_step_s, "generation_s": r.generation_s,
                         "rest_s": r.whole_step_s - r.generation_s} for r in trainer.step_records[1:]]
    results = []
    for name, rows in steps.items():
        medians = {key: statistics.median(row[key] for row in rows)
                   for key in ("whole_step_s", "generation_s", "rest_s")}
        results.append({"variant": name, "steps": rows, **{f"{k}_median": v for k, v in medians.items()}})
    stock = results[0]
    for result in results:
        for key in ("whole_step_s", "generation_s", "rest_s"):
            result[f"speedup_{key}"] = stock[f"{key}_median"] / result[f"{key}_median"]
        print(result["variant"], {k: round(v, 3) for k, v in result.items() if k.endswith(("_median", "_s"))
                                  or k.startswith("speedup")})
    save_report(args.out, results, {"recipe": args.recipe, "overrides": overrides, "order": ORDER,
                                    "note": "rest_s: the step less its generation phase (the loss phase and the "
                                            "optimizer step)"})


if __name__ == "__main__":
    main()
