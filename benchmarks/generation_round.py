"""One generation round of a recipe, timed four ways on the same trainer, model and prompts, in one process:

- `generate`: stock TRL's own `_generate_single_turn` (one `model.generate` over the rank's rows);
- `generate_hooked`: the same call under rl-lenbalance's capture hooks (what a captured round adds);
- `compaction`: rl-lenbalance's decode loop, finished rows leaving the batch;
- `compaction_hooked`: that loop under the hooks.

Every variant draws from the same seed each round (compaction samples exactly what `generate` samples), so all four
decode the same completions and the seconds compare like for like. The order is reversed every round, the first
round is warm-up, and medians come with ratios against `generate` from the same run.

    python benchmarks/generation_round.py recipes/quickstart.yaml --rounds 7 \
        --out docs/benchmarks/generation_round_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from _common import save_report  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rl_lenbalance.cli.compare import synchronize  # noqa: E402
from rl_lenbalance.cli.recipe import load_recipe  # noqa: E402
from rl_lenbalance.cli.train import build_trainer, parse_overrides  # noqa: E402

VARIANTS = ("generate", "generate_hooked", "compaction", "compaction_hooked")


def round_prompts(trainer, rows: int, group: int, round_index: int) -> list[list[int]]:
    """`rows` chat-formatted prompts of the trainer's dataset, each repeated `group` times (a GRPO round's rows)."""
    dataset = trainer.train_dataset
    prompts = []
    for k in range(rows // group):
        messages = dataset[(round_index * rows // group + k) % len(dataset)]["prompt"]
        ids = trainer.processing_class.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True)["input_ids"]
        prompts += [list(ids)] * group
    return prompts


def run_variant(trainer, name: str, prompts: list[list[int]]) -> list[list[int]]:
    """One round of `name` (see the module's docstring); returns the completions."""
    if name == "generate":
        ids = GRPOTrainer._generate_single_turn(trainer, prompts, None, {}, trainer.num_generations)
        return ids[0] if isinstance(ids, tuple) else ids
    backend = trainer._lenbalance_backend((trainer.num_generations,), {})
    compact = name.startswith("compaction")
    if not name.endswith("hooked"):
        return backend.decode(prompts, None, compact=True)
    with trainer.lenbalance.capture.capture(prompts) as captured:
        return backend.decode(prompts, captured, compact=compact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per variant, the first one warm-up")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides, as for train")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    fixed = {"report_to": "none", "save_strategy": "no", "output_dir": "/tmp/generation_round"}
    recipe = load_recipe(args.recipe, parse_overrides(args.set) | fixed)
    trainer = build_trainer(recipe)
    config = recipe.training
    rows = config.per_device_train_batch_size * config.gradient_accumulation_steps
    seconds: dict[str, list[float]] = {name: [] for name in args.variants}
    rounds = []
    for r in range(args.rounds):
        prompts = round_prompts(trainer, rows, config.num_generations, r)
        order = args.variants if r % 2 == 0 else args.variants[::-1]
        completions = {}
        for name in order:
            gc.collect()
            torch.manual_seed(1000 + r)
            synchronize()
            start = time.perf_counter()
            completions[name] = run_variant(trainer, name, prompts)
            synchronize()
            if r > 0:
                seconds[name].append(time.perf_counter() - start)
        lengths = [len(c) for c in completions[args.variants[0]]]
        rounds.append({"round": r, "warmup": r == 0, "lengths": lengths,
                       "same_completions": all(c == completions[args.variants[0]] for c in completions.values()),
                       "seconds": {name: seconds[name][-1] for name in args.variants} if r > 0 else None})
        print(rounds[-1], flush=True)
    base = statistics.median(seconds[args.variants[0]])
    results = [{"variant": name, "round_s_median": statistics.median(s), "round_s": s,
                "speedup_vs_generate": base / statistics.median(s)} for name, s in seconds.items()]
    for result in results:
        print(f"{result['variant']:>18}: {result['round_s_median']:.2f} s  {result['speedup_vs_generate']:.3f}×")
    save_report(args.out, results, {"recipe": args.recipe, "overrides": args.set, "rows": rows, "rounds": rounds,
                                    "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
