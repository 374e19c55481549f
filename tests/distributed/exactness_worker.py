"""Run under `torchrun --nproc_per_node 2`: stock GRPOTrainer vs rl-lenbalance on replayed completions.

For each (loss_type, gradient_accumulation_steps, num_iterations) both trainers start from the same weights and
seed, see the same completions (lengths and rewards differ inside every group), and train a few steps. Rank 0
writes, per setting, the max relative parameter difference, how far the parameters moved, and the padding and
rows-moved counters that prove rl-lenbalance actually reordered and trimmed.

    torchrun --nproc_per_node 2 tests/distributed/exactness_worker.py MODEL_DIR OUT.json
"""

import itertools
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import replay  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer, LenBalanceRLOOTrainer  # noqa: E402
from rl_lenbalance.loss import phase as loss_phase  # noqa: E402
from rl_lenbalance.loss.packed import DENSE_PACK_MAX_TOKENS  # noqa: E402

MODEL_DIR, OUT = sys.argv[1], sys.argv[2]


class Replay(replay.Replay):
    """Every third occurrence of a prompt short, the others up to 40 tokens."""

    def replayed(self, ids: list[int], k: int) -> list[int]:
        g = torch.Generator().manual_seed(hash(tuple(ids)) % 10_000 + 7919 * k + 31 * self.state.global_step)
        length = (int(torch.randint(1, 40, (1,), generator=g)) if k % 3
                  else int(torch.randint(1, 6, (1,), generator=g)))
        return torch.randint(10, 1000, (length,), generator=g).tolist()


class RecordMicrobatches:
    """Records the rows of every micro-batch rl-lenbalance builds (one list per generation batch)."""

    def _prepare_inputs(self, generation_batch):
        before = self._buffered_inputs
        inputs = super()._prepare_inputs(generation_batch)
        if self._buffered_inputs is not before:
            self.microbatch_rows = getattr(self, "microbatch_rows", []) + [
                [len(b["advantages"]) for b in self._buffered_inputs]]
        return inputs


def record_loss_forwards(trainer) -> list[int]:
    """The row count of each model forward with gradients (the loss forwards): 1 for a padding-free one."""
    rows: list[int] = []
    trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].size(0)) if torch.is_grad_enabled() else None,
        with_kwargs=True)
    return rows


class StockReplay(Replay, GRPOTrainer):
    pass


class LenBalanceReplay(RecordMicrobatches, Replay, LenBalanceGRPOTrainer):
    pass


class StockRLOOReplay(Replay, RLOOTrainer):
    pass


class LenBalanceRLOOReplay(RecordMicrobatches, Replay, LenBalanceRLOOTrainer):
    pass


def train(cls, loss_type, grad_acc, num_iterations, steps_per_generation=None, **extra):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float64)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    config_class, loss = (RLOOConfig, {}) if loss_type == "rloo" else (GRPOConfig, {"loss_type": loss_type})
    args = config_class(
        output_dir="/tmp/rl_lenbalance_exactness", per_device_train_batch_size=4, num_generations=4,
        gradient_accumulation_steps=grad_acc, num_iterations=num_iterations, max_completion_length=48,
        steps_per_generation=steps_per_generation, max_steps=3, learning_rate=1e-2, beta=0.0, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=1, seed=0, optim="sgd", max_grad_norm=0.0, **loss,
    )
    trainer = cls(model=model, processing_class=tokenizer, reward_funcs=replay.reward, args=args,
                  train_dataset=replay.dataset(),
                  **extra)
    trainer.loss_forward_rows = record_loss_forwards(trainer)
    trainer.train()
    return trainer, initial, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


results = []
# (loss_type, grad_acc, num_iterations, steps_per_generation, training_plan); num_iterations=1: uneven micro-batches,
# 2: 'auto', whose passes over one generation batch alternate strategies
SETTINGS = [(loss_type, g, n, None, "sorted_uneven" if n == 1 else "auto")
            for loss_type, g, n in itertools.product(["dapo", "grpo", "dr_grpo"], [1, 2], [1, 2])]
SETTINGS += [("grpo", 1, 1, 2, "sorted_uneven"), ("dapo", 2, 1, 4, "sorted_uneven")]  # two optimizer steps per
SETTINGS += [("rloo", 2, 1, None, "sorted_uneven"), ("rloo", 2, 2, None, "auto")]  # generation; RLOOTrainer
# padding-free loss forwards; "@N": at most N tokens per forward under the dense mask (several forwards per micro-batch)
SETTINGS += [("dapo", 2, 1, None, "packed@60"), ("grpo", 2, 2, None, "shared_prompt"), ("dapo", 2, 1, None,
                                                                                      "shared_prompt@60")]
for loss_type, grad_acc, num_iterations, spg, plan in SETTINGS:
    stock_class, our_class = (StockRLOOReplay, LenBalanceRLOOReplay) if loss_type == "rloo" else (
        StockReplay, LenBalanceReplay)
    _, initial, stock = train(stock_class, loss_type, grad_acc, num_iterations, spg)
    strategy, _, limit = plan.partition("@")
    loss_phase.DENSE_PACK_MAX_TOKENS = int(limit) if limit else DENSE_PACK_MAX_TOKENS
    config = LenBalanceConfig(training_plan=strategy, autotune_samples=1)
    lb, _, ours = train(our_class, loss_type, grad_acc, num_iterations, spg, lenbalance_config=config)
    rel = max(((stock[n] - ours[n]).norm() / stock[n].norm().clamp(min=1e-12)).item() for n in stock)
    moved = max(((stock[n] - initial[n]).norm() / initial[n].norm().clamp(min=1e-12)).item() for n in stock)
    logs = [row for row in lb.state.log_history if "lenbalance/train/pad_frac" in row]
    results.append({
        "loss_type": loss_type, "grad_acc": grad_acc, "num_iterations": num_iterations, "plan": plan,
        "steps_per_generation": lb.args.steps_per_generation, "microbatch_rows": lb.microbatch_rows,
        "max_rel_diff": rel, "moved": moved,
        "pad_frac": sum(r["lenbalance/train/pad_frac"] for r in logs) / len(logs),
        "pad_frac_stock": sum(r["lenbalance/train/pad_frac_stock"] for r in logs) / len(logs),
        "rank_imbalance": max(r["lenbalance/train/rank_imbalance"] for r in logs),
        "rank_imbalance_stock": max(r.get("lenbalance/train/rank_imbalance_stock", 1.0) for r in logs),
        "rows_moved": sum(r["lenbalance/train/rows_moved_across_ranks"] for r in logs),
        "slowest_rank_vs_stock": max(r["lenbalance/train/slowest_rank_vs_stock"] for r in logs),
        "world_size": lb.accelerator.num_processes, "loss_forward_rows": lb.loss_forward_rows,
    })
if int(os.environ.get("RANK", "0")) == 0:
    with open(OUT, "w") as f:
        json.dump(results, f, indent=1)

if torch.distributed.is_initialized():  # a clean shutdown: gloo threads left running at exit can abort the process
    torch.distributed.destroy_process_group()
