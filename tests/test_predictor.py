"""The predictor's math: entropy, pooling, soft labels, the loss, streaming PLP, online learning, save/load."""

import math

import pytest
import torch

from rl_lenbalance.predictor import (
    POOLING_METHODS,
    HeadConfig,
    NaiveLengthBaseline,
    OnlineTrainer,
    PLPHead,
    StreamingPool,
    bin_edges,
    bin_index,
    feature_size,
    plp_features,
    pool_tokens,
    soft_labels,
    token_entropy,
)


def test_entropy_matches_definition_and_survives_masked_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -math.inf, 2.0, -math.inf]])
    ent = token_entropy(logits)
    assert ent[0].item() == pytest.approx(math.log(4))
    p = torch.softmax(torch.tensor([1.0, 2.0]), 0)
    assert ent[1].item() == pytest.approx(-(p * p.log()).sum().item())
    assert torch.isfinite(ent).all()


def test_egtp_weights_are_softmax_of_entropy_over_real_tokens():
    torch.manual_seed(0)
    hidden, entropy = torch.randn(2, 5, 3), torch.rand(2, 5) * 3
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    pooled = pool_tokens(hidden, entropy, mask, "egtp")
    w = torch.softmax(entropy[0, 2:], 0)
    assert w.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(pooled[0], (w.unsqueeze(1) * hidden[0, 2:]).sum(0))
    # Padding positions never matter, whatever they hold.
    hidden2 = hidden.clone()
    hidden2[0, :2] = 1e6
    torch.testing.assert_close(pool_tokens(hidden2, entropy, mask, "egtp")[0], pooled[0])


def test_pooling_ablations():
    hidden = torch.arange(2 * 6 * 2, dtype=torch.float).reshape(2, 6, 2)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    ent = torch.zeros(2, 6)
    torch.testing.assert_close(pool_tokens(hidden, ent, mask, "mean")[0], hidden[0, 1:].mean(0))
    torch.testing.assert_close(pool_tokens(hidden, ent, mask, "max")[0], hidden[0, 1:].amax(0))
    torch.testing.assert_close(pool_tokens(hidden, ent, mask, "last")[0], hidden[0, -1])
    torch.testing.assert_close(pool_tokens(hidden, ent, mask, "first4")[0], hidden[0, 1:5].mean(0))
    # Equal entropies make EGTP the mean.
    torch.testing.assert_close(pool_tokens(hidden, ent, mask, "egtp"), pool_tokens(hidden, ent, mask, "mean"))
    with pytest.raises(ValueError, match="valid: egtp, mean"):
        pool_tokens(hidden, ent, mask, "median")
    assert set(POOLING_METHODS) == {"egtp", "mean", "max", "last", "first4"}


def test_streaming_pool_equals_batch_egtp():
    torch.manual_seed(1)
    hidden, entropy = torch.randn(3, 40, 8), torch.randn(3, 40) * 5
    stream = StreamingPool(3, 8)
    for t in range(40):
        stream.update(hidden[:, t], entropy[:, t])
        expected = pool_tokens(hidden[:, : t + 1], entropy[:, : t + 1], torch.ones(3, t + 1, dtype=torch.bool))
        torch.testing.assert_close(stream.value(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stream.last, hidden[:, -1])


def test_soft_labels_sum_to_one_and_peak_at_true_bin():
    labels = soft_labels(torch.tensor([0, 7, 19]), 20)
    torch.testing.assert_close(labels.sum(1), torch.ones(3))
    assert labels.argmax(1).tolist() == [0, 7, 19]
    assert labels[1, 6].item() == pytest.approx(labels[1, 7].item() * math.exp(-1))


def test_bins_are_log_spaced_and_cover_the_range():
    edges = bin_edges(20, 1024)
    assert edges[0] == 0 and edges[-1] == pytest.approx(1025)
    ratios = edges[2:] / edges[1:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, ratios[0].item()))
    assert bin_index(torch.tensor([0, 1024, 5000]), edges).tolist() == [0, 19, 19]


def test_loss_is_weighted_ce_plus_scaled_mse():
    head = PLPHead(HeadConfig(hidden_size=4, max_length=100, num_bins=5, ce_weight=0.7, dropout=0.0))
    z, y = torch.randn(6, 14), torch.tensor([1.0, 3.0, 10.0, 30.0, 60.0, 99.0])
    logits = head(z)
    target = soft_labels(bin_index(y, head.edges), 5)
    ce = -(target * torch.log_softmax(logits, -1)).sum(-1).mean()
    mse = ((head.expected_length(logits) - y) / 100).pow(2).mean()
    torch.testing.assert_close(head.loss(z, y), 0.7 * ce + 0.3 * mse)


def test_plp_features_layout():
    prompt = torch.randn(2, 4)
    assert plp_features(prompt, None, 0, 64).shape == (2, 14)
    z = plp_features(prompt, None, 0, 64)
    assert torch.equal(z[:, :4], prompt) and torch.equal(z[:, 4:12], torch.zeros(2, 8))


def test_online_training_lowers_mae_on_a_stationary_stream():
    """Remaining length is a function of the features; the head must learn it online."""
    torch.manual_seed(0)
    head = PLPHead(HeadConfig(hidden_size=8, max_length=512, dropout=0.0))
    trainer = OnlineTrainer(head, lr=3e-3, batch_size=128, steps_per_round=30)
    direction = torch.randn(26)

    def batch(n):
        z = torch.randn(n, 26)
        return z, (torch.sigmoid(z @ direction / 3) * 400 + 5).round()

    z_test, y_test = batch(512)
    before = trainer.mean_abs_error(z_test, y_test)
    for _ in range(15):
        trainer.observe(*batch(128))
    after = trainer.mean_abs_error(z_test, y_test)
    constant = (y_test - y_test.mean()).abs().mean().item()
    assert after < 0.5 * before and after < 0.6 * constant, (before, after, constant)


def test_non_finite_pairs_are_dropped_and_non_finite_loss_skipped():
    head = PLPHead(HeadConfig(hidden_size=4, max_length=64, dropout=0.0))
    trainer = OnlineTrainer(head, batch_size=4, steps_per_round=2)
    z = torch.randn(4, 14)
    z[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="skipped a predictor update"):
        trainer.observe(z, torch.tensor([1.0, 2.0, float("inf"), 4.0]))
        assert trainer.buffer.size == 2
        head.net[0].weight.data[0, 0] = float("nan")  # a diverged head: every loss is NaN
        trainer.observe(torch.randn(2, 14), torch.tensor([3.0, 5.0]))
    assert trainer.skipped_updates == 2


def test_naive_baseline_is_conditional_mean_remaining():
    base = NaiveLengthBaseline()
    assert base.predict_remaining(0) is None
    base.update([10, 20, 60])
    assert base.predict_remaining(0) == pytest.approx(30)
    assert base.predict_remaining(15) == pytest.approx(((20 - 15) + (60 - 15)) / 2)


def test_save_and_load_round_trip(tmp_path):
    head = PLPHead(HeadConfig(hidden_size=8, max_length=128, pooling="mean", feature_layer=3))
    head.save_pretrained(tmp_path / "p")
    assert (tmp_path / "p" / "predictor.safetensors").exists()
    loaded = PLPHead.from_pretrained(tmp_path / "p")
    assert loaded.config == head.config
    z = torch.randn(3, 26)
    torch.testing.assert_close(loaded.predict(z), head.predict(z))


def test_readout_is_the_median_bin_valued_at_its_training_mean():
    head = PLPHead(HeadConfig(hidden_size=8, max_length=100, num_bins=6))
    lengths = torch.tensor([100.0, 100.0, 100.0, 2.0])
    head.observe(bin_index(lengths, head.edges), lengths)
    top = head.config.num_bins - 1
    assert head.bin_values[top] == 100.0  # a bin of capped completions reads out the cap ...
    soft = soft_labels(torch.tensor([top, 0]), head.config.num_bins)
    assert head.readout(soft).tolist() == [100.0, 2.0]
    assert (soft[0] @ head.centers) < 80  # ... where the expected value over bin centres falls well short
    skewed = torch.tensor([[0.3, 0.1, 0.05, 0.04, 0.21, 0.3]])  # 49% of the mass lies below bin 4, 70% up to it
    assert head.readout(skewed).item() == head.bin_values[4].item()
    assert head.readout(torch.full((1, 6), float("nan"))).isnan().all()  # the engine's health check must see it


def test_a_head_trained_on_capped_lengths_predicts_the_cap():
    torch.manual_seed(0)
    head = PLPHead(HeadConfig(hidden_size=8, max_length=64, num_bins=10, dropout=0.0))
    z = torch.randn(64, feature_size(8))
    y = torch.where(z[:, 0] > 0, 64.0, 5.0)  # half the completions hit the cap, half stop at 5 tokens
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(200):
        loss = head.loss(z, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (head.predict(z) - y).abs().max() < 1.0
