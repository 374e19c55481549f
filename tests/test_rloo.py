"""rl-lenbalance inside a real TRL RLOOTrainer: the swap-in trainer and the callback both train and log, and the
completions TRL receives keep RLOO's return type."""

import torch
from helpers import PROMPTS, chat, make_trainer
from trl import RLOOConfig, RLOOTrainer

from rl_lenbalance import LenBalanceConfig, LenBalanceRLOOTrainer, wrap_trainer
from rl_lenbalance.config import cpu_has_fast_bf16


def make(cls, model_dir, tmp_path, **kwargs):
    args = RLOOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                      gradient_accumulation_steps=2, max_completion_length=32, max_steps=3, use_cpu=True,
                      report_to="none", save_strategy="no", logging_steps=1, seed=0, temperature=1.0, top_k=0,
                      bf16=cpu_has_fast_bf16())
    return make_trainer(cls, model_dir, args, **kwargs)


def test_rloo_trains_with_waves_rebucketing_and_balanced_microbatches(eos_tiny_model_dir, tmp_path):
    config = LenBalanceConfig(generation_wave_size=4, rebucket=True, probe_tokens=4)
    trainer = make(LenBalanceRLOOTrainer, eos_tiny_model_dir, tmp_path, lenbalance_config=config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.lenbalance.rounds == 3
    logged = [row for row in trainer.state.log_history if "lenbalance/predictor/mae_static" in row]
    assert len(logged) == 3 and "lenbalance/train/pad_frac" in logged[-1]
    totals = trainer.lenbalance_totals
    assert totals.loss_tokens <= totals.loss_tokens_stock
    assert totals.reprefill_tokens > 0  # rounds 2 and 3 were re-bucketed
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_the_callback_wraps_a_stock_rloo_trainer(eos_tiny_model_dir, tmp_path):
    trainer = wrap_trainer(make(RLOOTrainer, eos_tiny_model_dir, tmp_path),
                           LenBalanceConfig(compaction=True, max_overhead=1.0))  # every round captured
    prompt_ids, _, _ = trainer._tokenize_prompts(chat(PROMPTS[:2]))
    completions = trainer._generate_single_turn(prompt_ids, None, {})
    assert isinstance(completions, list) and all(isinstance(c, list) for c in completions)  # RLOO: no logprobs
    trainer.train()
    assert trainer.lenbalance.rounds == 4 and trainer.state.global_step == 3
