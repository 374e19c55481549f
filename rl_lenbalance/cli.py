"""`rl-lenbalance` command line: `train RECIPE [--set KEY=VALUE ...]`."""

from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    parser = argparse.ArgumentParser(prog="rl-lenbalance", description="Length-aware rollout balancing for TRL.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="GRPO with rl-lenbalance from a recipe YAML; prints what it saved.")
    train.add_argument("recipe", help="A recipe YAML, e.g. recipes/quickstart.yaml.")
    train.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help="Override recipe keys, e.g. --set max_steps=2 lenbalance.compaction=false.")
    args = parser.parse_args(argv)
    if args.command == "train":
        from .train import parse_overrides, run

        run(args.recipe, parse_overrides(args.set))


if __name__ == "__main__":
    main()
