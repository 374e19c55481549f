"""Run under `torchrun --nproc_per_node 2`: greedy generation with early re-bucketing across ranks vs stock.

Rank 0 holds prompts with long answers, rank 1 prompts with short ones, so after the probe rank 0 has more rows
running and re-bucketing sends some to rank 1. Each rank writes whether the completions TRL received equal stock
generation's, row for row, in both rounds (round 1 is unpredicted; round 2 re-buckets), and the ledger.

    torchrun --nproc_per_node 2 tests/distributed/rebucket_worker.py MODEL_DIR OUT_PREFIX
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer  # noqa: E402
from rl_lenbalance.config import cpu_has_fast_bf16  # noqa: E402

MODEL_DIR, OUT = sys.argv[1], sys.argv[2]
RANK = int(os.environ["RANK"])
QUESTIONS = [  # greedy lengths with the embedded model: 48, 39 (rank 0); 19, 24 (rank 1)
    ["Explain in two sentences why the sky is blue.", "Write a haiku about the sea."],
    ["Translate 'good morning' into French.", "Say hi."],
][RANK]


def trainer(cls, **extra):
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    args = GRPOConfig(output_dir="/tmp/rl_lenbalance_rebucket", per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=48, use_cpu=True, report_to="none", save_strategy="no", seed=0,
                      generation_kwargs={"do_sample": False}, bf16=cpu_has_fast_bf16())
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in QUESTIONS * 4])
    return cls(model=model, processing_class=tokenizer, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
               args=args, train_dataset=dataset, **extra)


stock = trainer(GRPOTrainer)
prompt_ids, _, _ = stock._tokenize_prompts([[{"role": "user", "content": q}] for q in QUESTIONS for _ in range(4)])
expected, _ = stock._generate_single_turn(prompt_ids, None, {}, 4)
config = LenBalanceConfig(compaction=True, rebucket=True, probe_tokens=20)
ours = trainer(LenBalanceGRPOTrainer, lenbalance_config=config)
equal = []
for _ in range(2):
    got, _ = ours._generate_single_turn(prompt_ids, None, {}, 4)
    equal.append(got == expected)
metrics = {k.removeprefix("lenbalance/gen/"): v for k, v in ours._metrics["train"].items() if "/gen/" in k}
with open(f"{OUT}.{RANK}.json", "w") as f:
    json.dump({"equal": equal, "lengths": [len(c) for c in expected], "metrics": metrics,
               "world_size": ours.accelerator.num_processes, "rounds": ours.lenbalance.rounds}, f, indent=1)

if torch.distributed.is_initialized():  # a clean shutdown: gloo threads left running at exit can abort the process
    torch.distributed.destroy_process_group()
