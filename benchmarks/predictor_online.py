"""The length head online, in the real GRPO trainer on this machine (issue 22): every round's honest error of the head
and of the naive / per-prompt history / sibling estimates, in two prompt settings.

`run` trains LenBalanceGRPOTrainer on the embedded SmolLM2 and keeps every round's training pairs (the exact tensors
the engine learned from, with each row's prompt) under DUMP/SETTING/. `evaluate` replays those rounds, in order,
through fresh engine heads (`rl_lenbalance.bench.online.replay_rounds`: the same scoring and `OnlineTrainer` steps as
in the trainer), with and without context features, plus the same head trained offline on all rounds, and writes
the report. Splitting the two lets head variants be compared on identical rollouts.

    python benchmarks/predictor_online.py run --dump /tmp/plp_rounds --rounds 20
    python benchmarks/predictor_online.py evaluate --dump /tmp/plp_rounds --out docs/benchmarks/predictor_online_cpu.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from _common import save_report  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer  # noqa: E402
from rl_lenbalance.models import load_model  # noqa: E402
from rl_lenbalance.tasks import REWARD_FUNCS, arithmetic_dataset  # noqa: E402

SETTINGS = {  # name -> distinct prompts in the dataset (TRL's sampler reshuffles every epoch)
    "distinct": lambda rounds, prompts_per_round: rounds * prompts_per_round,  # one epoch: no prompt recurs
    "recurring": lambda rounds, prompts_per_round: 4 * prompts_per_round,  # an epoch every 4 rounds
}


def run_setting(name: str, args: argparse.Namespace) -> None:
    """Train for `args.rounds` generation rounds, saving each round's training pairs and its prompts' keys."""
    out = Path(args.dump) / name
    out.mkdir(parents=True, exist_ok=True)
    prompts_per_round = args.completions // args.generations
    dataset = arithmetic_dataset(SETTINGS[name](args.rounds, prompts_per_round), seed=args.seed)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="rl_lenbalance_plp_"), use_cpu=True, max_steps=args.rounds, seed=args.seed,
        per_device_train_batch_size=args.completions, gradient_accumulation_steps=1, num_generations=args.generations,
        max_completion_length=args.max_length, temperature=1.0, top_k=0, beta=0.0, loss_type="dapo",
        learning_rate=1e-6, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
    )
    trainer = LenBalanceGRPOTrainer(
        model=model, processing_class=tokenizer, reward_funcs=REWARD_FUNCS, args=config, train_dataset=dataset,
        lenbalance_config=LenBalanceConfig(max_overhead=1.0, compaction=True, training_plan="sorted",
                                           log_table_every=0),
    )
    engine, learn_round = trainer.lenbalance, trainer.lenbalance.learn_round

    def dump_round(waves, lengths, own_ids, gather):
        pairs = engine.training_pairs(waves, lengths)
        metrics, table = learn_round(waves, lengths, own_ids, gather)
        torch.save({"pairs": {k: v.half() if v.is_floating_point() and v.dim() == 2 else v
                              for k, v in vars(pairs).items()},
                    "max_length": args.max_length, "trainer_metrics": metrics},
                   out / f"round_{engine.rounds - 1:03d}.pt")
        print(f"{name} round {engine.rounds - 1}: " + ", ".join(
            f"{k.split('/')[-1]}={v:.2f}" for k, v in metrics.items() if "mae" in k or "kendall" in k), flush=True)
        return metrics, table

    engine.learn_round = dump_round
    trainer.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["run", "evaluate"])
    parser.add_argument("--dump", required=True, help="Folder of the saved rounds (one subfolder per setting).")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--completions", type=int, default=32, help="Completions per round.")
    parser.add_argument("--generations", type=int, default=2, help="Completions per prompt (GRPO's G).")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="evaluate: the JSON report.")
    args = parser.parse_args()
    if args.phase == "run":
        for name in args.settings:
            run_setting(name, args)
        return
    from rl_lenbalance.bench.online import evaluate_rounds

    results = [evaluate_rounds(Path(args.dump) / name, name, seed=args.seed) for name in args.settings]
    save_report(args.out, results)


if __name__ == "__main__":
    main()
