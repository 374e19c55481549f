"""Stock TRL GRPOTrainer vs rl-lenbalance, same model, data and seeds, measured in one run.

Each variant trains the same number of GRPO steps from the same weights; the script times the generation phase
(`_generate_and_score_completions`) and the loss phase (the rest of each training step) and counts padding the
same way for every variant (decode slots of its generate calls, loss-forward tokens of its micro-batches).

    python benchmarks/step_time.py --steps 3 --out docs/benchmarks/step_time_cpu.json
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
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer  # noqa: E402
from rl_lenbalance.models import load_model  # noqa: E402
from rl_lenbalance.tasks import REWARD_FUNCS, arithmetic_dataset  # noqa: E402

VARIANTS = {
    "stock": None,
    "lenbalance_training_equal": {"uneven_microbatches": False},
    "lenbalance_training_only": {},
    "lenbalance_waves": {"generation_wave_size": 8},
    "lenbalance_compaction": {"compaction": True},
}


def timed(base):
    """`base` with phase timers and a padding count that do not change what it computes."""

    class Timed(base):
        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            self.bench["generation_s"] += time.perf_counter() - start
            lengths = out["completion_mask"].sum(1)
            self.bench["completion_tokens"] += int(lengths.sum())
            return out

        def compute_loss(self, model, inputs, *args, **kwargs):
            self.bench["loss_tokens"] += inputs["prompt_ids"].numel() + inputs["completion_ids"].numel()
            self.bench["loss_real_tokens"] += int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

        def training_step(self, *args, **kwargs):
            start = time.perf_counter()
            out = super().training_step(*args, **kwargs)
            self.bench["step_s"] += time.perf_counter() - start
            return out

    return Timed


def run_variant(name: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    config = GRPOConfig(
        output_dir=f"/tmp/rl_lenbalance_bench/{name}", use_cpu=True, max_steps=args.steps, seed=0,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.grad_acc,
        num_generations=args.generations, max_completion_length=args.max_length, temperature=1.0, top_k=0,
        beta=0.0, loss_type="dapo", learning_rate=1e-6, report_to="none", save_strategy="no", logging_steps=1,
    )
    kwargs = dict(model=model, processing_class=tokenizer, reward_funcs=REWARD_FUNCS, args=config,
                  train_dataset=arithmetic_dataset(64, seed=0))
    settings = VARIANTS[name]
    if settings is None:
        trainer = timed(GRPOTrainer)(**kwargs)
    else:
        trainer = timed(LenBalanceGRPOTrainer)(**kwargs, lenbalance_config=LenBalanceConfig(**settings))
    trainer.bench = dict.fromkeys(["generation_s", "step_s", "completion_tokens", "loss_tokens", "loss_real_tokens"], 0)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    bench = trainer.bench
    result = {
        "variant": name, "settings": settings, "wall_s": wall, "generation_s": bench["generation_s"],
        "loss_phase_s": bench["step_s"] - bench["generation_s"], "completion_tokens": bench["completion_tokens"],
        "loss_pad_frac": 1 - bench["loss_real_tokens"] / bench["loss_tokens"],
    }
    if settings is not None:
        totals = trainer.lenbalance_totals
        result["decode_slot_waste"] = 1 - totals["gen/real_tokens"] / totals["gen/decode_slots"]
        result["decode_slot_waste_stock_same_batch"] = 1 - totals["gen/real_tokens"] / totals["gen/decode_slots_stock"]
        result["predictor_overhead_s"] = totals["predictor/overhead_s"]
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Model folder or id (default: the embedded SmolLM2).")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--grad-acc", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = [run_variant(name, args) for name in args.variants]
    stock = next((r for r in results if r["variant"] == "stock"), None)
    if stock:
        for r in results:
            for key in ("wall_s", "generation_s", "loss_phase_s"):
                r[f"speedup_{key}"] = stock[key] / r[key]
    save_report(args.out, results)

if __name__ == "__main__":
    main()
