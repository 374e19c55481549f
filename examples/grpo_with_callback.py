"""Add rl-lenbalance to a stock TRL GRPOTrainer you already have: one callback.

    python examples/grpo_with_callback.py --max-steps 2
"""

import argparse
import time

from trl import GRPOConfig, GRPOTrainer

from rl_lenbalance import LenBalanceCallback, LenBalanceConfig
from rl_lenbalance.builtin.models import load_model
from rl_lenbalance.builtin.tasks import REWARD_FUNCS, arithmetic_dataset
from rl_lenbalance.cli.train import print_summary, summarize

parser = argparse.ArgumentParser()
parser.add_argument("--max-steps", type=int, default=2)
args = parser.parse_args()

model, tokenizer = load_model()  # the embedded SmolLM2-135M-Instruct; pass a folder or hub id for your own
trainer = GRPOTrainer(
    model=model,
    processing_class=tokenizer,
    reward_funcs=REWARD_FUNCS,
    train_dataset=arithmetic_dataset(32, seed=0),
    args=GRPOConfig(output_dir="outputs/example", use_cpu=True, max_steps=args.max_steps, num_generations=4,
                    per_device_train_batch_size=4, gradient_accumulation_steps=2, max_completion_length=64,
                    beta=0.0, loss_type="dapo", report_to="none", logging_steps=1),
)
trainer.add_callback(LenBalanceCallback(trainer, LenBalanceConfig()))
start = time.perf_counter()
trainer.train()
print_summary(summarize(trainer, time.perf_counter() - start))  # the same table `rl-lenbalance train` prints
