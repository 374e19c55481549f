"""`rl-lenbalance` command line: `train RECIPE [--set KEY=VALUE ...]`, `compare RECIPE [--steps N]`,
`report RUN_DIR [--out DIR]`."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

from ..extras import MissingExtraError, require
from ..loss import STRATEGIES

MIN_COMPARE_STEPS = 2  # compare_recipe's one warm-up step, then at least one timed step


def _checked(kind: type, valid: Callable[[float], bool], hint: str) -> Callable[[str], float]:
    """An argparse `type`: the text read as `kind`, refused (exit 2, one line) unless `valid`, saying `hint`."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{text} is not valid: use {hint}")
        return value

    return parse


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
    compare.add_argument("--steps", default=4, type=_checked(int, lambda n: n >= MIN_COMPARE_STEPS,
                                                             f"{MIN_COMPARE_STEPS} or more (a warm-up step, then the "
                                                             "timed ones)"),
                         help=f"Optimizer steps per trainer, the warm-up step included ({MIN_COMPARE_STEPS} or more).")
    compare.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                         help="Override recipe keys, as for train.")
    compare.add_argument("--plans", nargs="*", default=[], choices=list(STRATEGIES), metavar="STRATEGY",
                         help="Also run rl-lenbalance with lenbalance.training_plan pinned to each of these loss "
                              f"strategies ({', '.join(STRATEGIES)}), to see what 'auto' chose from.")
    compare.add_argument("--turn-timeout", default=3600.0, metavar="SECONDS",
                         type=_checked(float, lambda s: 0 < s < math.inf, "a number of seconds above 0"),
                         help="Stop with an error when one trainer spends longer than this on one optimizer step.")
    report = commands.add_parser("report", help="PNG panels + one self-contained HTML page of a finished run.")
    report.add_argument("run_dir", help="A training output_dir, a wandb offline-run-* folder, or its .wandb file.")
    report.add_argument("--out", help="Output folder (default: RUN_DIR/report).")
    args, rest = parser.parse_known_args(argv)
    try:
        _run(parser, args, rest)
    except MissingExtraError as error:
        parser.exit(2, f"rl-lenbalance: error: {error}\n")


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> None:
    """The command `args` names."""
    if args.command in ("train", "compare") and not rest:
        require("rich", f"rl-lenbalance {args.command}'s tables")
    if args.command == "train" and not rest:
        from .train import run_command

        run_command(parser, args.recipe, args.set)
    elif args.command == "compare" and not rest:
        from .compare import CompareError, compare_recipe
        from .recipe import RecipeError
        from .train import parse_overrides

        try:
            compare_recipe(args.recipe, parse_overrides(args.set), steps=args.steps, turn_timeout_s=args.turn_timeout,
                           plans=args.plans)
        except RecipeError as error:
            parser.exit(2, f"rl-lenbalance: error: {error}\n")
        except CompareError as error:  # the failed variant's traceback (if it raised), then one line
            parser.exit(2, f"{error.details}rl-lenbalance: error: {error}\n")
    elif args.command == "report" and not rest:
        require("matplotlib", "rl-lenbalance report")
        require("wandb", "rl-lenbalance report")
        from .report import main as report_main

        report_main([args.run_dir] + (["--out", args.out] if args.out else []))
    else:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")


if __name__ == "__main__":
    main()
