"""The padding-free loss strategies in the real trainer, `packed` (each micro-batch's rows as one sequence) and
`shared_prompt` (each group's prompt computed once, as prompt trees): the update equals stock GRPOTrainer's (float64
tiny models, same seed), the model is seen to run the layout (not the ledger's word for it), and models that cannot
run it fall back."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_update, make_args, prompt_dataset, train, varied_reward
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOTrainer

from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer

pytestmark = pytest.mark.compat  # also on transformers 5.17 (`make test-compat`)

LOSSES = [("dapo", {}), ("grpo", {"num_iterations": 2}), ("dr_grpo", {"mask_truncated_completions": True}),
          ("cispo", {}), ("dapo", {"beta": 0.04})]


def config(plan: str) -> LenBalanceConfig:
    return LenBalanceConfig(training_plan=plan, predictor_steps_per_round=2)


def padded_rows(trainer) -> list[int]:
    """Rows of the loss forwards that ran TRL's padded rectangle (a padding-free forward is one row, `(1, N)`)."""
    return [rows for rows, _ in trainer.loss_forward_shapes if rows > 1]


@pytest.mark.parametrize("plan", ["packed", "shared_prompt"])
@pytest.mark.parametrize(("loss_type", "extra"), LOSSES)
def test_padding_free_training_learns_what_stock_learns(eos_tiny_model_dir, tmp_path, plan, loss_type, extra):
    run = dict(loss_type=loss_type, max_steps=2, max_completion_length=24, **extra)
    ours = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, lenbalance=config(plan), **run)
    stock = train(GRPOTrainer, eos_tiny_model_dir, tmp_path, **run)
    assert ours._lenbalance_loss.tuner.candidates == [plan]
    assert ours.loss_forward_shapes and not padded_rows(ours)  # every loss forward ran padding-free
    assert all(rows > 1 for rows, _ in stock.loss_forward_shapes)
    assert_same_update(stock, ours)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_shared_prompt_in_float32_learns_what_stock_learns_up_to_float32_noise(eos_tiny_model_dir, tmp_path,
                                                                                loss_type):
    """In float32 a shared prompt's gradient is rounded once for its G uses, stock's once per copy: the updates
    agree to float32 noise, far below how far the parameters moved."""
    run = dict(loss_type=loss_type, max_steps=2, max_completion_length=24, dtype=torch.float32, bf16=False)
    ours = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, lenbalance=config("shared_prompt"), **run)
    stock = train(GRPOTrainer, eos_tiny_model_dir, tmp_path, **run)
    assert not padded_rows(ours)
    moved = max(((p - stock.initial[n]).norm() / p.norm()).item() for n, p in stock.model.named_parameters())
    assert moved > 1e-3
    assert_same_update(stock, ours, tol=1e-5)


def test_shared_prompt_computes_each_prompt_once_per_microbatch(eos_tiny_model_dir, tmp_path):
    """Groups of 4 rows share a prompt (10-20 tokens): the shared layout runs fewer tokens than `packed` on the same
    rows, and the ledger counts fewer computed tokens than the rows hold (a negative padding fraction)."""
    run = dict(max_steps=1, max_completion_length=24)
    shared = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, lenbalance=config("shared_prompt"), **run)
    packed = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, lenbalance=config("packed"), **run)
    seen = {name: sum(n for _, n in t.loss_forward_shapes) for name, t in (("shared", shared), ("packed", packed))}
    assert seen["shared"] < seen["packed"] - 3 * 10  # >= 2 groups, each saving >= 3 prompt copies
    pads = [row["lenbalance/train/pad_frac"] for row in shared.state.log_history if "lenbalance/train/pad_frac" in row]
    assert pads and all(pad < 0 for pad in pads)


@pytest.mark.parametrize("plan", ["packed", "shared_prompt"])
def test_a_microbatch_over_the_dense_mask_limit_runs_in_parts_and_learns_what_stock_learns(eos_tiny_model_dir,
                                                                                          tmp_path, monkeypatch, plan):
    """Under sdpa a sequence of N tokens builds an (N, N) mask: past the limit a micro-batch runs as several
    padding-free forwards (rows kept whole), never padded."""
    run = dict(max_steps=2, max_completion_length=24)
    monkeypatch.setattr("rl_lenbalance.loss.phase.DENSE_PACK_MAX_TOKENS", 60)
    ours = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, lenbalance=config(plan), **run)
    stock = train(GRPOTrainer, eos_tiny_model_dir, tmp_path, **run)
    assert not padded_rows(ours) and len(ours.loss_forward_shapes) >= 2 * len(stock.loss_forward_shapes)
    assert_same_update(stock, ours)


def test_a_model_that_cannot_pack_falls_back_to_sorted_with_a_note(family_model_dir, tmp_path):
    """NemotronH's Mamba2 layers carry state along the sequence: a pack would leak from one row into the next."""
    with pytest.warns(UserWarning, match=r"training_plan='packed': .*recurrent state.*using 'sorted'"):
        ours = train(LenBalanceGRPOTrainer, family_model_dir("nemotron_h"), tmp_path, max_steps=1,
                     lenbalance=config("packed"), model_kwargs={"experts_implementation": "eager"})
    assert ours._lenbalance_loss.tuner.candidates == ["sorted"]


def test_auto_names_the_strategies_it_leaves_out(tiny_model_dir, tmp_path):
    """flex_attention takes no dense 4D mask: 'auto' measures every other exact strategy and says why."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="flex_attention")
    with pytest.warns(UserWarning, match=r"leaves out 'shared_prompt' \(attn_implementation='flex_attention'"):
        auto = LenBalanceGRPOTrainer(model=model, reward_funcs=varied_reward, args=make_args(tmp_path),
                                     processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
                                     train_dataset=prompt_dataset())
    assert ("packed" in auto._lenbalance_loss.tuner.candidates
            and "shared_prompt" not in auto._lenbalance_loss.tuner.candidates)
