"""The `packed` loss strategy in the real trainer: each micro-batch's rows run as one padding-free sequence, and
the update equals stock GRPOTrainer's (float64 tiny models, same seed); models that cannot pack fall back."""

from __future__ import annotations

import pytest
from trl import GRPOTrainer

from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer

from helpers import assert_same_update, train

PACKED = dict(training_plan="packed", predictor_steps_per_round=2)


@pytest.mark.parametrize(("loss_type", "extra"), [("dapo", {}), ("grpo", {"num_iterations": 2}),
                                                  ("dr_grpo", {"mask_truncated_completions": True}),
                                                  ("cispo", {}), ("dapo", {"beta": 0.04})])
def test_packed_training_learns_what_stock_learns_with_no_padding(eos_tiny_model_dir, tmp_path, loss_type, extra):
    run = dict(loss_type=loss_type, max_steps=2, max_completion_length=24, **extra)
    ours = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, lenbalance=LenBalanceConfig(**PACKED), **run)
    stock = train(GRPOTrainer, eos_tiny_model_dir, tmp_path, **run)
    assert ours._autotune.candidates == ["packed"]
    pads = [row["lenbalance/train/pad_frac"] for row in ours.state.log_history if "lenbalance/train/pad_frac" in row]
    assert pads and all(pad == 0.0 for pad in pads)  # the model saw no padding token
    assert_same_update(stock, ours)


def test_a_model_that_cannot_pack_falls_back_to_sorted_with_a_note(family_model_dir, tmp_path):
    """NemotronH's Mamba2 layers carry state along the sequence: a pack would leak from one row into the next."""
    with pytest.warns(UserWarning, match=r"training_plan='packed': .*recurrent state.*using 'sorted'"):
        ours = train(LenBalanceGRPOTrainer, family_model_dir("nemotron_h"), tmp_path, max_steps=1,
                     lenbalance=LenBalanceConfig(**PACKED), model_kwargs={"experts_implementation": "eager"})
    assert ours._autotune.candidates == ["sorted"]


def test_a_pack_too_long_for_a_dense_mask_trains_padded_and_still_learns_what_stock_learns(eos_tiny_model_dir,
                                                                                         tmp_path, monkeypatch):
    """Under sdpa a pack of N tokens builds an (N, N) mask: past the limit the micro-batch runs padded (the same
    rows); 'auto' measures `packed` there too."""
    run = dict(max_steps=2, max_completion_length=24)
    monkeypatch.setattr("rl_lenbalance.integrations.trl.DENSE_PACK_MAX_TOKENS", 0)
    ours = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, lenbalance=LenBalanceConfig(**PACKED), **run)
    stock = train(GRPOTrainer, eos_tiny_model_dir, tmp_path, **run)
    pads = [row["lenbalance/train/pad_frac"] for row in ours.state.log_history if "lenbalance/train/pad_frac" in row]
    assert pads and all(pad > 0.0 for pad in pads)  # every micro-batch ran padded
    assert_same_update(stock, ours)
    auto = train(LenBalanceGRPOTrainer, eos_tiny_model_dir, tmp_path, max_steps=1)
    assert "packed" in auto._autotune.candidates
