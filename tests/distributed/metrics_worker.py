"""Run under `torchrun --nproc_per_node 2`: what stock GRPOTrainer/RLOOTrainer log against what rl-lenbalance logs
when its micro-batches regroup rows, across ranks too, on replayed completions (the same for both trainers).

Rank 0 writes, per setting, the largest relative difference of each metric stock logs, and the rows moved.

    torchrun --nproc_per_node 2 tests/distributed/metrics_worker.py MODEL_DIR OUT.json
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import replay  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer, LenBalanceRLOOTrainer  # noqa: E402

MODEL_DIR, OUT = sys.argv[1], sys.argv[2]
WALL_CLOCK = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


class Replay(replay.Replay):
    """Rank 0's completions long, rank 1's short."""

    def replayed(self, ids: list[int], k: int) -> list[int]:
        g = torch.Generator().manual_seed(len(ids) + 7919 * k + 31 * self.state.global_step)
        longest = 40 if self.accelerator.process_index == 0 else 8
        return torch.randint(10, 1000, (int(torch.randint(1, longest, (1,), generator=g)),), generator=g).tolist()


class StockGRPO(Replay, GRPOTrainer):
    pass


class OursGRPO(Replay, LenBalanceGRPOTrainer):
    pass


class StockRLOO(Replay, RLOOTrainer):
    pass


class OursRLOO(Replay, LenBalanceRLOOTrainer):
    pass


def train(cls, loss_type, **extra):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float64)
    config_class, loss = (RLOOConfig, {}) if loss_type == "rloo" else (GRPOConfig, {"loss_type": loss_type,
                                                                                     "beta": 0.04})
    args = config_class(
        output_dir="/tmp/rl_lenbalance_metrics", per_device_train_batch_size=4, num_generations=4,
        gradient_accumulation_steps=2, num_iterations=2, epsilon=1e-3, max_completion_length=48, max_steps=2,
        learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, seed=0,
        optim="sgd", max_grad_norm=0.0, **loss,
    )
    trainer = cls(model=model, processing_class=tokenizer, reward_funcs=replay.reward, args=args,
                  train_dataset=replay.dataset(),
                  **extra)
    trainer.train()
    return trainer


results = []
for loss_type, plan in [("grpo", "sorted_uneven"), ("dapo", "packed"), ("rloo", "sorted_uneven")]:
    stock_class, our_class = (StockRLOO, OursRLOO) if loss_type == "rloo" else (StockGRPO, OursGRPO)
    stock = train(stock_class, loss_type)
    ours = train(our_class, loss_type, lenbalance_config=LenBalanceConfig(training_plan=plan))
    diff, clipped = {}, 0.0
    for a, b in zip(stock.state.log_history, ours.state.log_history, strict=True):
        for key in a.keys() - WALL_CLOCK:
            scale = max(abs(a[key]), 1e-12)
            diff[key] = max(diff.get(key, 0.0), abs(b.get(key, float("inf")) - a[key]) / scale)
        clipped += a.get("clip_ratio/region_mean", 0.0)
    logs = [row for row in ours.state.log_history if "lenbalance/train/rows_moved_across_ranks" in row]
    results.append({"loss_type": loss_type, "plan": plan, "diff": diff, "clipped": clipped,
                    "rows_moved": sum(r["lenbalance/train/rows_moved_across_ranks"] for r in logs),
                    "world_size": ours.accelerator.num_processes})
if int(os.environ.get("RANK", "0")) == 0:
    with open(OUT, "w") as f:
        json.dump(results, f, indent=1)

if torch.distributed.is_initialized():  # a clean shutdown: gloo threads left running at exit can abort the process
    torch.distributed.destroy_process_group()
