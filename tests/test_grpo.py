"""rl-lenbalance inside a real TRL GRPOTrainer on a tiny local model: generation equals stock, the predictor
trains online, metrics reach the trainer's logs, checkpoints carry the predictor, bad settings fail clearly."""

import pytest
import torch
from helpers import PROMPTS, chat, make_args, make_trainer
from trl import GRPOTrainer

from rl_lenbalance import LenBalanceCallback, LenBalanceConfig, LenBalanceGRPOTrainer, wrap_trainer

pytestmark = pytest.mark.compat  # also on transformers 5.17 (`make test-compat`)


@pytest.mark.slow
def test_greedy_generation_in_waves_and_compacted_equals_stock_row_for_row(embedded_dir, tmp_path):
    """Waves ordered by prediction and a batch that drops finished rows, reassembled: the completions TRL
    receives are stock's, in stock's order. (The real model: a random tiny one decodes every prompt greedily
    to the same length.)"""
    args = make_args(tmp_path, generation_kwargs={"do_sample": False}, max_completion_length=48)
    stock = make_trainer(GRPOTrainer, embedded_dir, args)
    prompts = chat([p for p in PROMPTS for _ in range(2)])
    prompt_ids, _, _ = stock._tokenize_prompts(prompts)
    expected, _ = stock._generate_single_turn(prompt_ids, None, {}, 4)
    assert len({len(c) for c in expected}) >= 3, "the prompts should give varied lengths"
    # compaction alone reads no prediction: max_overhead=1.0 captures round 2 too (past the budget it has no hooks)
    configs = (LenBalanceConfig(generation_wave_size=4, compaction=False), LenBalanceConfig(
               generation_wave_size=4, rebucket=True, probe_tokens=8, compaction=False),
               LenBalanceConfig(compaction=True, rebucket=True, probe_tokens=8),
               LenBalanceConfig(compaction=True, max_overhead=1.0))
    for config in configs:
        ours = make_trainer(LenBalanceGRPOTrainer, embedded_dir, args, lenbalance_config=config)
        for _ in range(2):  # round 1: stock-order waves; round 2: waves ordered (and re-bucketed) by the predictor
            got, _ = ours._generate_single_turn(prompt_ids, None, {}, 4)
            assert got == expected
        assert ours.lenbalance.rounds == 2
        totals = ours.lenbalance_totals
        assert (totals.reprefill_tokens > 0) == config.rebucket  # re-bucketing ran in round 2
        if config.compaction:  # every decode slot was a real token
            assert totals.decode_slots == totals.generated_tokens < totals.decode_slots_stock
        else:
            assert totals.decode_steps > totals.decode_steps_stock  # waves run one after another


@pytest.mark.parametrize("settings", [{}, {"compaction": True},
                                      {"generation_wave_size": 4, "rebucket": True, "probe_tokens": 4},
                                      {"generation_wave_size": 4, "rebucket": True, "probe_tokens": 4,
                                       "context_features": True}])
def test_grpo_steps_log_lenbalance_metrics_and_train_the_predictor(eos_tiny_model_dir, tmp_path, settings):
    trainer = make_trainer(LenBalanceGRPOTrainer, eos_tiny_model_dir, make_args(tmp_path, max_steps=4),
                           lenbalance_config=LenBalanceConfig(max_overhead=1.0, **settings))
    before = {k: v.clone() for k, v in trainer.lenbalance.head.state_dict().items()}
    trainer.train()
    logged = [row for row in trainer.state.log_history if "lenbalance/predictor/mae_static" in row]
    assert len(logged) >= 2
    for key in ("predictor/mae_naive_static", "predictor/mae_history_static", "predictor/mae_sibling_static",
                "predictor/loss", "gen/slot_waste_stock", "train/pad_frac",
                "train/pad_frac_stock", "predictor/overhead_frac"):
        assert f"lenbalance/{key}" in logged[-1], key
    assert trainer.lenbalance.rounds == 4 and trainer.lenbalance.trainer.buffer.size > 0
    assert any(not torch.equal(before[k], v) for k, v in trainer.lenbalance.head.state_dict().items())
    totals = trainer.lenbalance_totals
    assert totals.loss_tokens <= totals.loss_tokens_stock
    assert 0 < totals.generated_tokens <= totals.decode_slots
    assert (totals.reprefill_tokens > 0) == bool(settings.get("rebucket"))  # sampled rows outlived the probe


def test_callback_wraps_a_stock_trainer_and_checkpoints_the_predictor(eos_tiny_model_dir, tmp_path):
    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = make_trainer(GRPOTrainer, eos_tiny_model_dir, args)
    trainer.add_callback(LenBalanceCallback(trainer))
    assert type(trainer).__name__ == "LenBalanceGRPOTrainer" and hasattr(trainer, "lenbalance")
    trainer.train()
    saved = tmp_path / "out" / "checkpoint-2" / "lenbalance"
    assert (saved / "predictor.safetensors").exists() and (saved / "engine_state.pt").exists()
    # A fresh trainer resuming from the checkpoint gets the same head back.
    resumed = wrap_trainer(make_trainer(GRPOTrainer, eos_tiny_model_dir, make_args(tmp_path, max_steps=2)))
    assert any(isinstance(c, LenBalanceCallback) for c in resumed.callback_handler.callbacks)
    resumed.lenbalance.load(saved)
    for key, value in trainer.lenbalance.head.state_dict().items():
        assert torch.equal(value.cpu(), resumed.lenbalance.head.state_dict()[key].cpu())
    assert resumed.lenbalance.rounds == trainer.lenbalance.rounds


@pytest.mark.parametrize(
    ("overrides", "config", "match"),
    [
        ({}, {"generation_wave_size": 64}, r"generation_wave_size=64.*per_device_train_batch_size=8"),
        ({}, {"rebucket": True, "probe_tokens": 31}, r"probe_tokens=31.*max_completion_length=32"),
    ],
)
def test_settings_that_contradict_trl_are_refused(eos_tiny_model_dir, tmp_path, overrides, config, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(LenBalanceGRPOTrainer, eos_tiny_model_dir, make_args(tmp_path, **overrides),
                     lenbalance_config=LenBalanceConfig(**config))


def test_training_plan_off_keeps_stock_prepare_inputs(eos_tiny_model_dir, tmp_path):
    trainer = make_trainer(LenBalanceGRPOTrainer, eos_tiny_model_dir,
                           make_args(tmp_path, loss_type="bnpo", max_steps=1),
                           lenbalance_config=LenBalanceConfig(training_plan="off"))
    trainer.train()
    logged = {key for row in trainer.state.log_history for key in row}
    assert "lenbalance/predictor/mae_static" in logged  # generation is still captured and predicted
    assert not any(key.startswith("lenbalance/train/pad_frac") for key in logged)  # stock micro-batches
    assert trainer.lenbalance_totals.loss_tokens == 0


def test_a_diverged_predictor_falls_back_and_training_goes_on(eos_tiny_model_dir, tmp_path):
    trainer = make_trainer(LenBalanceGRPOTrainer, eos_tiny_model_dir, make_args(tmp_path, max_steps=2),
                           lenbalance_config=LenBalanceConfig(generation_wave_size=4))
    with torch.no_grad():
        for p in trainer.lenbalance.head.parameters():
            p.fill_(float("nan"))
    with pytest.warns(UserWarning, match="falls back to stock ordering"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.lenbalance.fallbacks >= 1
    assert all(torch.isfinite(p).all() for p in trainer.lenbalance.head.parameters())  # re-initialised
    logged = [row["lenbalance/predictor/fallbacks"] for row in trainer.state.log_history
              if "lenbalance/predictor/fallbacks" in row]
    assert logged and logged[-1] >= 1
