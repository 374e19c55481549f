"""Run under `torchrun --nproc_per_node 2`: rows dealt to ranks by predicted work on the admitted backends (vLLM,
transformers continuous batching) come back to their rows, and what is learned is stock's.

For each backend, stock GRPOTrainer and LenBalanceGRPOTrainer train `ROUNDS` rounds from the same float64 weights and
seed. The dataset is read in order (`shuffle_dataset=False`) and arranged so that in every round rank 0 holds two
prompts with long answers and rank 1 two with short ones. Round 1 is unpredicted; from round 2 the head has trained
and `run_admitted` may deal whole groups to the other rank (`balance_rows`), which generates them and sends the
completions (and vLLM's logprobs) back to the rank whose rows they are.
- "vllm": a vLLM colocate stand-in (`tests/stand_ins.py`): each completion and its logprobs are a pure function of
  the row, whichever rank generates it; rewards vary inside every group, so training moves the weights; the
  logprobs enter the loss (vLLM importance-sampling correction, `token_truncate`), so a misplaced one would change
  the update.
- "cb": transformers' real continuous batching, greedy (the tiny model perturbed so that its greedy answers depend
  on the prompt); greedy groups have equal rewards, so this backend checks rows, not learning.

Each rank writes OUT_PREFIX.RANK.json, per backend: what TRL received each round, in its row order, from both
trainers (prompt and completion ids, rewards, advantages, sampling logprobs); the prompts each trainer submitted for
generation on this rank; the largest relative parameter difference to stock and how far stock's parameters moved;
and the rows-moved counter rl-lenbalance logged (`lenbalance/gen/rows_moved_across_ranks`, summed over ranks).

    torchrun --nproc_per_node 2 tests/distributed/admitted_worker.py MODEL_DIR OUT_PREFIX [vllm,cb]
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared stand-in

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from stand_ins import with_stand_in  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer  # noqa: E402

MODEL_DIR, OUT = sys.argv[1], sys.argv[2]
BACKENDS = sys.argv[3].split(",") if len(sys.argv) > 3 else ["vllm", "cb"]
RANK = int(os.environ["RANK"])
ROUNDS = 4
# the perturbed tiny model's greedy answers (cb) run 24 tokens (the cap) for LONG, 3 to 9 for SHORT; the stand-in
# (vllm) draws 24 to 63 tokens for LONG, 1 to 3 for SHORT
LONG = ["Explain how tides work.", "Explain why ice floats.", "Explain how a rainbow forms.",
        "Explain what causes wind.", "Explain why the sky is blue.", "Explain what causes rain.",
        "Explain how plants grow.", "Explain what causes thunder."]
SHORT = ["Ok.", "Why?", "Pick a letter.", "3+3?", "Who?", "Yes?", "Hello", "One word, please."]
# read in order: each round's 4 prompts × 4 generations, the first 8 rows on rank 0 (long), the last 8 on rank 1
QUESTIONS = [q for r in range(ROUNDS) for q in LONG[2 * r : 2 * r + 2] + SHORT[2 * r : 2 * r + 2]]


class Recorded:
    """Records what TRL received each round, on this rank, in its row order."""

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        prompt, completion = batch["prompt_mask"].bool(), batch["completion_mask"].bool()
        logps = batch.get("sampling_per_token_logps")  # vLLM's, per token (continuous batching reports none)
        self.rounds.append({
            "prompts": [ids[m].tolist() for ids, m in zip(batch["prompt_ids"], prompt, strict=True)],
            "completions": [ids[m].tolist() for ids, m in zip(batch["completion_ids"], completion, strict=True)],
            "logprobs": None if logps is None else [lp[m].tolist() for lp, m in zip(logps, completion, strict=True)],
            "advantages": batch["advantages"].tolist(),
            "rewards": self.rewards[-1],
        })
        return batch


class Stock(Recorded, GRPOTrainer):
    pass


class Ours(Recorded, LenBalanceGRPOTrainer):
    pass


def train(cls, backend, **extra):
    """Train `ROUNDS` rounds generating through `backend` ("vllm": the stand-in; "cb": transformers' continuous
    batching); returns the trainer (what it submitted for generation in `trainer.submitted`) and the initial weights."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float64)  # regrouped sums agree to ~1e-12
    if backend == "cb":  # the tiny model greedily repeats one token; perturbed, its greedy answers (and where they
        noise = torch.Generator().manual_seed(0)  # end) depend on the prompt
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.add_(torch.randn(p.shape, generator=noise, dtype=p.dtype) * 0.3)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    generation = dict(use_transformers_continuous_batching=True, generation_kwargs={"do_sample": False},
                      transformers_continuous_batching_config=dict(page_size=32, num_blocks=64, max_batch_tokens=256),
                      max_completion_length=24) if backend == "cb" else dict(max_completion_length=64)
    args = GRPOConfig(
        output_dir="/tmp/rl_lenbalance_admitted", per_device_train_batch_size=4, gradient_accumulation_steps=2,
        num_generations=4, max_steps=ROUNDS, shuffle_dataset=False, learning_rate=1e-2, optim="sgd",
        max_grad_norm=0.0, beta=0.0, loss_type="dapo", bf16=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, seed=0, vllm_importance_sampling_mode="token_truncate", **generation,
    )
    rewards: list[list[float]] = []

    def reward(completion_ids, **kwargs):  # varies inside every sampled group: non-zero advantages
        rewards.append([len(c) / 64.0 + (c[0] % 7) / 7.0 for c in completion_ids])
        return rewards[-1]

    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in QUESTIONS])
    trainer = cls(model=model, processing_class=tokenizer, reward_funcs=reward, args=args, train_dataset=dataset,
                  **extra)
    trainer.rounds, trainer.rewards = [], rewards
    if backend == "vllm":
        with_stand_in(  # long answers for LONG; logprobs near the tiny model's own (~ -log 49152)
            trainer, "colocate", lengths=lambda p: (24, 64) if any(q in tokenizer.decode(p) for q in LONG) else (1, 4),
            logprob=lambda token: -10.8 + 0.1 * (token % 5 - 2))
        trainer.vllm_importance_sampling_correction = True  # the logprobs enter the loss
        trainer.submitted = trainer.vllm_generation.submitted
    else:
        trainer.submitted, generate_batch = [], model.generate_batch

        def record(prompt_ids, *args, **kwargs):
            trainer.submitted.append([tuple(p) for p in prompt_ids])
            return generate_batch(prompt_ids, *args, **kwargs)

        model.generate_batch = record
    trainer.train()
    return trainer, initial


def compare(backend):
    """What both trainers received and learned, generating through `backend`."""
    stock, initial = train(Stock, backend)
    ours, _ = train(Ours, backend, lenbalance_config=LenBalanceConfig(max_overhead=1.0))  # every round learns
    final_stock, final_ours = dict(stock.model.named_parameters()), dict(ours.model.named_parameters())
    logged = [row for row in ours.state.log_history if "lenbalance/gen/rows_moved_across_ranks" in row]
    return {
        "world_size": ours.accelerator.num_processes, "rank": RANK, "rounds": ours.lenbalance.rounds,
        "stock": stock.rounds, "ours": ours.rounds,
        "submitted_stock": stock.submitted, "submitted_ours": ours.submitted,
        "max_rel_diff": max(((final_stock[n] - final_ours[n]).norm() / final_stock[n].norm()).item()
                            for n in final_stock),
        "moved": max(((final_stock[n] - initial[n]).norm() / initial[n].norm()).item() for n in initial),
        "rows_moved": [row["lenbalance/gen/rows_moved_across_ranks"] for row in logged],  # reduced over ranks
        "healthy": [row["lenbalance/predictor/healthy"] for row in logged],
    }


with open(f"{OUT}.{RANK}.json", "w") as f:
    json.dump({backend: compare(backend) for backend in BACKENDS}, f)

if torch.distributed.is_initialized():  # a clean shutdown: gloo threads left running at exit can abort the process
    torch.distributed.destroy_process_group()
