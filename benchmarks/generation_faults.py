"""Minor page faults per optimizer step, split by the generation phase's parts, in one `rl-lenbalance train`
process (glibc's default allocator unless the MALLOC_* variables are set):

    python benchmarks/generation_faults.py --steps 12 --out docs/benchmarks/generation_faults_train_12_cpu.json

Each part (`_generate_and_score_completions`, TRL's own generate, the decode loop, the capture's rollout and online
update, rewards, log-prob forwards, the whole training step) is wrapped in a `getrusage` counter; the plan each step
ran is read back from the logs (`lenbalance/autotune/strategy/<name>`, `lenbalance/gen/plan/<name>`).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import trl  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from rl_lenbalance.cli import train  # noqa: E402
from rl_lenbalance.cli.recipe import load_recipe  # noqa: E402
from rl_lenbalance.generation import engine  # noqa: E402
from rl_lenbalance.integrations.trl import generation  # noqa: E402
from rl_lenbalance.ledger import logged_name  # noqa: E402

FAULTS: collections.Counter = collections.Counter()


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def count(owner, name: str, label: str) -> None:
    """Wrap `owner.name` so that the page faults inside each call add to `FAULTS[label]`."""
    inner = getattr(owner, name)

    def counted(*args, **kwargs):
        before = faults()
        try:
            return inner(*args, **kwargs)
        finally:
            FAULTS[label] += faults() - before

    setattr(owner, name, counted)


class PerStep(TrainerCallback):
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_step_begin(self, args, state, control, **kwargs):
        FAULTS.clear()
        self.start, self.clock = faults(), time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.rows.append(dict(FAULTS, step=state.global_step, step_faults=faults() - self.start,
                              seconds=round(time.perf_counter() - self.clock, 1),
                              peak_resident_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    count(trl.GRPOTrainer, "_generate_and_score_completions", "generation_phase")
    count(trl.GRPOTrainer, "_generate_single_turn", "trl_generate")
    count(trl.GRPOTrainer, "_get_per_token_logps_and_entropies", "logps_forwards")
    count(trl.GRPOTrainer, "_calculate_rewards", "rewards")
    count(trl.GRPOTrainer, "training_step", "training_step")
    count(engine.LenBalanceEngine, "learn_round", "online_update")
    count(generation, "run_rollout", "captured_rollout")
    count(generation, "compacted_generate", "decode_loop")
    recipe = load_recipe(args.recipe, {"max_steps": args.steps, "report_to": "none", "logging_steps": 1,
                                       "output_dir": f"/tmp/generation_faults_{os.getpid()}"})
    trainer = train.build_trainer(recipe)
    clock = PerStep()
    trainer.add_callback(clock)
    trainer.train()
    logs = {int(row["step"]): row for row in trainer.state.log_history if "step" in row and "loss" in row}
    for row in clock.rows:
        log = logs.get(row["step"], {})
        row |= {"strategy": logged_name(log, "autotune/strategy"), "generation_plan": logged_name(log, "gen/plan")}
    malloc = {key: os.environ.get(key) for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    with open(args.out, "w") as out:
        json.dump({"command": f"python benchmarks/generation_faults.py --steps {args.steps} --out {args.out}",
                   "recipe": args.recipe, "malloc": malloc, "steps": clock.rows}, out, indent=2)


if __name__ == "__main__":
    main()
