"""Generation scheduling in the real trainer: stock vs waves vs early re-bucketing, measured in one run.

Each variant trains the same GRPO steps from the same weights and seed (sampling: each variant draws its own
completions). Per generation round it records, over all ranks, what rl-lenbalance's ledger measured (decode steps
of the slowest rank, decode slots, re-prefilled tokens, generation seconds of the slowest rank) and, for the same
rows' true lengths, what two schedules would have cost: memory-limited waves in stock order (TRL has no waves; this
is the baseline a memory-limited run pays) and the oracle (rows regrouped by true length, across ranks too).
Round 1 is unpredicted in every variant (the head has seen nothing yet).

    python benchmarks/rebucket.py --out docs/benchmarks/rebucket_cpu.json
    torchrun --nproc_per_node 2 benchmarks/rebucket.py --out docs/benchmarks/rebucket_cpu_2ranks.json

It runs on the GPU when there is one (bf16 there). On a GPU, decode steps are the cost (a finished row is nearly
free); on a CPU, time follows decode slots, and compaction removes the slots of finished rows, so the CPU's own
regime is the `compaction*` variants.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from _common import save_report  # noqa: E402
from accelerate.utils import gather_object  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer  # noqa: E402
from rl_lenbalance.builtin.models import load_model  # noqa: E402
from rl_lenbalance.builtin.tasks import REWARD_FUNCS, arithmetic_dataset  # noqa: E402
from rl_lenbalance.schedule import rebucket, wave_cost  # noqa: E402

VARIANTS = {
    "one_call": {},
    "waves": {"generation_wave_size": "W"},
    "waves_rebucket": {"generation_wave_size": "W", "rebucket": True},
    "compaction": {"compaction": True},
    "compaction_rebucket": {"compaction": True, "rebucket": True},
}


def recording(base):
    """`base` that keeps, per generation round, every rank's row lengths and the round's lenbalance metrics."""

    class Recording(base):
        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            start = time.perf_counter()
            completions, extra = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            seconds = time.perf_counter() - start
            lengths = gather_object([[len(c) for c in completions]]) if self.accelerator.num_processes > 1 else [
                [len(c) for c in completions]]
            slowest = max(gather_object([seconds])) if self.accelerator.num_processes > 1 else seconds
            metrics = {k.removeprefix("lenbalance/gen/"): v[-1] for k, v in self._metrics["train"].items()
                       if k.startswith("lenbalance/gen/")}
            self.rounds_log.append({"lengths": lengths, "seconds_slowest_rank": slowest, **metrics})
            return completions, extra

    return Recording


def counterfactuals(lengths: list[list[int]], wave_size: int, compacted: bool) -> dict[str, float]:
    """Slowest rank's decode steps and slots for the same rows: stock-order waves, and the oracle plan."""
    flat = [n for rank in lengths for n in rank]
    origin = [r for r, rank in enumerate(lengths) for _ in rank]
    stock_waves = [[[i for i in range(len(flat)) if origin[i] == r][s:s + wave_size]
                    for s in range(0, len(lengths[r]), wave_size)] for r in range(len(lengths))]
    oracle = rebucket([float(n) for n in flat], origin, len(lengths), wave_size, compacted)

    def slowest(plan, steps: bool) -> float:
        return max(sum(max(flat[i] for i in w) if steps else wave_cost(flat, w, compacted) for w in rank if w)
                   for rank in plan)

    return {"stock_waves_steps": slowest(stock_waves, True), "oracle_steps": slowest(oracle, True),
            "stock_waves_slots": slowest(stock_waves, False), "oracle_slots": slowest(oracle, False)}


def run_variant(name: str, args: argparse.Namespace) -> dict:
    settings = {k: args.wave_size if v == "W" else v for k, v in VARIANTS[name].items()}
    settings |= {"probe_tokens": args.probe} if settings.get("rebucket") else {}
    torch.manual_seed(0)
    gpu = torch.cuda.is_available()
    model, tokenizer = load_model(None, dtype=torch.bfloat16 if gpu else torch.float32)
    config = GRPOConfig(
        output_dir=f"/tmp/rl_lenbalance_rebucket/{name}", use_cpu=not gpu, bf16=gpu, max_steps=args.steps, seed=0,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.grad_acc,
        num_generations=args.generations, max_completion_length=args.max_length, temperature=1.0, top_k=0,
        beta=0.0, loss_type="dapo", learning_rate=1e-6, report_to="none", save_strategy="no", logging_steps=1,
    )
    trainer = recording(LenBalanceGRPOTrainer)(
        model=model, processing_class=tokenizer, reward_funcs=REWARD_FUNCS, args=config,
        train_dataset=arithmetic_dataset(64, seed=0), lenbalance_config=LenBalanceConfig(**settings))
    trainer.rounds_log = []
    trainer.train()
    compacted = bool(settings.get("compaction"))
    wave_size = settings.get("generation_wave_size") or args.batch * args.grad_acc
    rounds = []
    for log in trainer.rounds_log:
        row = {k: v for k, v in log.items() if k != "lengths"} | counterfactuals(log["lengths"], wave_size, compacted)
        row["measured_slots_slowest_rank"] = log["decode_slots"] / len(log["lengths"]) * log["rank_imbalance"]
        rounds.append(row)
    later = rounds[1:]  # the predicted rounds

    def total(key: str) -> float:
        return sum(r[key] for r in later)

    summary = {"variant": name, "settings": settings, "rounds": rounds}
    if later:
        summary |= {
            "predicted_rounds": len(later),
            "decode_steps": total("decode_steps"), "stock_waves_steps": total("stock_waves_steps"),
            "oracle_steps": total("oracle_steps"), "generation_s_slowest_rank": total("seconds_slowest_rank"),
            "reprefill_tokens": total("reprefill_tokens"), "rows_moved": total("rows_moved_across_ranks"),
            "rank_imbalance_slots": max(r["rank_imbalance"] for r in later),
            "rank_imbalance_slots_stock": max(r["rank_imbalance_stock"] for r in later),
        }
        gain = summary["stock_waves_steps"] - summary["oracle_steps"]
        summary["share_of_oracle_step_gain"] = ((summary["stock_waves_steps"] - summary["decode_steps"]) / gain
                                                if gain else None)
    if trainer.accelerator.is_main_process:
        print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}), flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--grad-acc", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--wave-size", type=int, default=4)
    parser.add_argument("--probe", type=int, default=32, help="lenbalance.probe_tokens")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = [run_variant(name, args) for name in args.variants]
    if int(os.environ.get("RANK", "0")) == 0:
        save_report(args.out, results)

if __name__ == "__main__":
    main()
