"""`rl-lenbalance` command line: `train RECIPE [--set KEY=VALUE ...]`, `compare RECIPE [--steps N]`,
`report RUN_DIR [--out DIR]`, `bench ...`."""

from __future__ import annotations

import argparse
import os

from .schedule import STRATEGIES


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    parser = argparse.ArgumentParser(prog="rl-lenbalance", description="Length-aware rollout balancing for TRL.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="GRPO with rl-lenbalance from a recipe YAML; prints what it saved.")
    train.add_argument("recipe", help="A recipe YAML, e.g. recipes/quickstart.yaml.")
    train.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help="Override recipe keys, e.g. --set max_steps=2 lenbalance.compaction=false.")
    compare = commands.add_parser("compare", help="Stock TRL vs rl-lenbalance on this machine, in seconds per phase.")
    compare.add_argument("recipe", help="A recipe YAML, e.g. recipes/quickstart.yaml.")
    compare.add_argument("--steps", type=int, default=4, help="Optimizer steps per trainer, the warm-up step included.")
    compare.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Override recipe keys, as for train.")
    compare.add_argument("--plans", nargs="*", default=[], choices=list(STRATEGIES), metavar="STRATEGY",
                         help="Also run rl-lenbalance with lenbalance.training_plan pinned to each of these loss "
                              f"strategies ({', '.join(STRATEGIES)}), to see what 'auto' chose from.")
    compare.add_argument("--turn-timeout", type=float, default=3600.0, metavar="SECONDS",
                         help="Stop with an error when one trainer spends longer than this on one optimizer step.")
    report = commands.add_parser("report", help="PNG panels + one self-contained HTML page of a finished run.")
    report.add_argument("run_dir", help="A training output_dir, a wandb offline-run-* folder, or its .wandb file.")
    report.add_argument("--out", help="Output folder (default: RUN_DIR/report).")
    commands.add_parser("bench", add_help=False, help="The predictor benchmark: `rl-lenbalance bench --help`.")
    args, rest = parser.parse_known_args(argv)
    if args.command == "train" and not rest:
        from .recipe import RecipeError
        from .train import parse_overrides, run

        try:
            run(args.recipe, parse_overrides(args.set))
        except RecipeError as error:  # a recipe or --set value that cannot be used: the message says what to change
            parser.exit(2, f"rl-lenbalance: error: {error}\n")
    elif args.command == "compare" and not rest:
        from .compare import compare_recipe
        from .recipe import RecipeError
        from .train import parse_overrides

        try:
            compare_recipe(args.recipe, parse_overrides(args.set), steps=args.steps, turn_timeout_s=args.turn_timeout,
                           plans=args.plans)
        except RecipeError as error:
            parser.exit(2, f"rl-lenbalance: error: {error}\n")
    elif args.command == "report" and not rest:
        from .report import main as report_main

        report_main([args.run_dir] + (["--out", args.out] if args.out else []))
    elif args.command == "bench":
        from .bench.cli import main as bench_main

        bench_main(rest)
    else:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")


if __name__ == "__main__":
    main()
