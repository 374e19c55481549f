"""Add rl-lenbalance to a stock TRL GRPOTrainer you already have: one callback.

    python examples/grpo_with_callback.py --max-steps 2
"""

import argparse

from trl import GRPOConfig, GRPOTrainer

from rl_lenbalance import LenBalanceCallback, LenBalanceConfig
from rl_lenbalance.models import load_model
from rl_lenbalance.tasks import REWARD_FUNCS, arithmetic_dataset

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
trainer.train()
totals = trainer.lenbalance_totals
print(f"loss-forward padding: {1 - totals['train/real_tokens'] / totals['train/loss_tokens']:.1%} "
      f"(stock TRL on the same batches: {1 - totals['train/real_tokens'] / totals['train/loss_tokens_stock']:.1%})")
print(f"decode slots wasted: {1 - totals['gen/real_tokens'] / totals['gen/decode_slots']:.1%} "
      f"(stock: {1 - totals['gen/real_tokens'] / totals['gen/decode_slots_stock']:.1%})")
