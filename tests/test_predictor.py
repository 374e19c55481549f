"""The predictor's math: entropy, pooling, soft labels, the loss, streaming PLP, online learning, save/load."""

import math

import pytest
import torch
from helpers import tiny_decoder

from rl_lenbalance.predictor import (
    CONTEXT_SIZE,
    POOLING_METHODS,
    HeadConfig,
    LengthHistory,
    NaiveLengthBaseline,
    OnlineTrainer,
    PLPHead,
    StreamingPool,
    bin_edges,
    bin_index,
    context_vector,
    feature_size,
    kendall_tau,
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
    assert base.predict_median(0) == 20 and base.predict_median(15) == 5  # of (5, 45): the lower middle value
    assert base.predict_median(60) is None


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


# --- context features ----------------------------------------------------------------------------------------------


def test_history_and_sibling_estimates_are_conditional_means_of_past_rows():
    history = LengthHistory()
    history.update([1, 1, 2, 2], [10, 30, 50, 70])  # prompt 1: 10, 30; prompt 2: 50, 70
    assert history.history_estimate(1, 0) == pytest.approx(20)
    assert history.history_estimate(1, 20) == pytest.approx(10)  # only 30 is still running at 20
    assert history.history_estimate(3, 0) is None  # never seen
    assert history.sibling_estimate(0, 0.0) is None  # fewer than MIN_SUPPORT past rows
    history.update([3] * 8 + [4] * 8, [5] * 4 + [40] * 4 + [60] * 8)
    # running at t=20 with no sibling finished: 50, 70 and prompt 4's eight 60s; prompt 3's 40s (4 of 7 siblings
    # finished) and prompt 1's 30 (its 10 finished) fall in the band above one half, with too few rows
    assert history.sibling_estimate(20, 0.0) == pytest.approx((30 + 50 + 8 * 40) / 10)
    assert history.sibling_estimate(20, 0.9) is None
    restored = LengthHistory()
    restored.load_state_dict(history.state_dict())
    assert restored.rows == history.rows and restored.history_estimate(2, 0) == pytest.approx(60)


def test_context_vector_falls_back_to_naive_and_reads_finished_siblings():
    history = LengthHistory()
    history.update([1, 1], [20, 40])
    vector = context_vector(history, naive=50.0, prompt=1, step=10, siblings=[8, 100, 4], max_length=100, median=30.0)
    assert len(vector) == CONTEXT_SIZE
    assert vector[:4] == pytest.approx([0.5, 0.2, 0.5, 0.3])  # naive, history (20), sibling (no support: naive), median
    assert vector[6:] == pytest.approx([2 / 3, 0.06])  # two of three siblings finished, mean length 6
    unseen = context_vector(LengthHistory(), naive=None, prompt=2, step=0, siblings=[], max_length=100)
    assert unseen == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0])


def test_kendall_tau():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert kendall_tau(x, x * 10) == pytest.approx(1.0)
    assert kendall_tau(x, -x) == pytest.approx(-1.0)
    assert kendall_tau(x, torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(4 / 6)
    assert math.isnan(kendall_tau(x, torch.ones(4)))


def test_the_context_prior_lets_the_head_copy_an_estimate():
    head = PLPHead(HeadConfig(hidden_size=8, max_length=128, context_size=CONTEXT_SIZE)).eval()
    with torch.no_grad():
        head.net[-1].weight.zero_()
        head.net[-1].bias.zero_()
        head.prior_weight.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0]))  # trust the history estimate only
    context = torch.zeros(3, CONTEXT_SIZE)
    context[:, 0] = 0.9  # naive: 115 tokens
    context[:, 1] = torch.tensor([3.0, 20.0, 90.0]) / 128
    predicted = head.predict(torch.cat([torch.randn(3, feature_size(8)), context], 1))
    wanted = bin_index(torch.tensor([3.0, 20.0, 90.0]), head.edges)
    assert torch.equal(bin_index(predicted, head.edges), wanted)


def test_engine_metrics_score_every_estimate_and_rank_rows(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from rl_lenbalance.config import LenBalanceConfig
    from rl_lenbalance.generation.engine import LenBalanceEngine, TrainingPairs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    engine = LenBalanceEngine(model, LenBalanceConfig(context_features=True, samples_per_sequence=1), 64)
    width = feature_size(model.config.hidden_size)
    lengths = torch.tensor([40, 50, 60, 34, 36, 38, 60, 63])  # prompt k's rows: 2k, 2k+1

    def round_pairs() -> TrainingPairs:
        pairs = TrainingPairs.empty(8, 1, width)
        pairs.row, pairs.prompt, pairs.length = torch.arange(8), torch.arange(8) // 2, lengths
        pairs.y0, pairs.y32 = lengths.float(), (lengths - 32).float()
        pairs.z32 = torch.randn(8, width)
        pairs.z, pairs.y, pairs.step = pairs.z32, pairs.y32, torch.full((8,), 32)
        return pairs

    first = engine.learn(round_pairs(), lengths)
    assert "predictor/mae_history_plp32" not in first  # nothing to compare with before any history
    # the naive estimate is logged beside round 1's MAE (half the tokens left) but judges the head only from round 2
    assert first["predictor/mae_naive_static"] == pytest.approx((lengths - 32).abs().float().mean().item())
    assert first["predictor/mae_naive_plp32"] == pytest.approx((lengths - 32 - 16).abs().float().mean().item())
    assert engine.rounds_worse_than_naive == 0
    second = engine.learn(round_pairs(), lengths)
    assert second["predictor/mae_history_static"] == pytest.approx(
        (lengths - lengths.view(4, 2).float().mean(1).repeat_interleave(2)).abs().float().mean().item())
    assert second["predictor/mae_naive_static"] == pytest.approx((lengths - lengths.float().mean()).abs().mean().item())
    assert {"predictor/mae_sibling_static", "predictor/mae_sibling_plp32", "predictor/kendall_plp32"} <= set(second)
    assert -1.0 <= second["predictor/kendall_plp32"] <= 1.0
    assert engine.trainer.buffer.features.size(1) == width + CONTEXT_SIZE


def test_the_probe_reads_the_input_its_training_pair_holds_and_its_live_error_is_logged(eos_tiny_model_dir):
    """Round 2 re-buckets after a probe of 32 tokens: each running row's live input at t=32 (siblings that ended in
    the probe visible) is the training pair's input at t=32, and the logged live MAEs are those of the predictions
    the scheduler read, from a head whose prediction is known."""
    from rl_lenbalance.config import LenBalanceConfig
    from rl_lenbalance.generation.engine import PLP_REPORT_STEP, LenBalanceEngine
    from rl_lenbalance.generation.rollout import Backend, RolloutSettings, run_rollout

    model, tokenizer, _, prompts, decode = tiny_decoder(eos_tiny_model_dir, 48, do_sample=True, copies=4)
    backend = Backend(decode, lambda *_: None, gather=lambda items: items)
    engine = LenBalanceEngine(model, LenBalanceConfig(samples_per_sequence=2), max_length=48)
    torch.manual_seed(1)
    _, stats = run_rollout(prompts, backend, engine, RolloutSettings([tokenizer.eos_token_id], 48, compact=True))
    engine.learn_round(stats.waves, stats.lengths, stats.own_ids, gather=lambda rows: rows)
    past = torch.tensor(list(stats.lengths.values()))
    with torch.no_grad():  # a known head: every row's prediction is bin 5's read-out value
        engine.head.net[-1].weight.zero_()
        engine.head.net[-1].bias.copy_(torch.arange(engine.head.config.num_bins) == 5).mul_(100.0)
    known = engine.head.bin_values[5].item()
    read, predict = [], engine.predict

    def spy(inputs):  # the capture holds its own reference: only the probe's prediction comes through here
        read.append(inputs)
        return predict(inputs)

    engine.predict = spy
    settings = RolloutSettings([tokenizer.eos_token_id], 48, compact=True, rebucket=True, probe_tokens=PLP_REPORT_STEP)
    for seed in range(2, 30):  # the first round 2 with rows past the probe, some with a sibling that ended in it
        read.clear()
        torch.manual_seed(seed)
        _, stats = run_rollout(prompts, backend, engine, settings)
        if stats.waves[0].capture.probe is not None and (read[0][:, -2] > 0).any():
            break
    engine.predict = predict
    probe_wave = stats.waves[0]
    step, probed = probe_wave.capture.probe
    running = probed.isfinite().nonzero().flatten()
    assert step == PLP_REPORT_STEP and len(read) == 1 and len(running) == len(read[0]) > 0
    lengths = torch.tensor([stats.lengths[row] for row in probe_wave.rows])
    assert (lengths[running] > PLP_REPORT_STEP + 1).all() and (lengths[probed.isnan()] <= PLP_REPORT_STEP + 1).all()

    pairs = engine.training_pairs(stats.waves, stats.lengths)
    _, x32, _ = engine.round_inputs(pairs)
    assert torch.equal(pairs.row[: len(lengths)], torch.tensor(probe_wave.rows))  # the probe wave's entries lead
    assert torch.equal(x32[running], read[0])  # the same vector, context included
    finished = read[0][:, -2]  # the context's fraction of siblings that ended by t=32
    assert (finished > 0).any()  # sibling ends were visible to the probe

    metrics, table = engine.learn_round(stats.waves, stats.lengths, stats.own_ids, gather=lambda rows: rows)
    assert metrics["predictor/live_mae_static"] == pytest.approx((lengths - known).abs().float().mean().item())
    remaining = lengths[running] - PLP_REPORT_STEP
    assert metrics["predictor/live_mae_plp32"] == pytest.approx((remaining - known).abs().float().mean().item())
    naive = (past[past > PLP_REPORT_STEP] - PLP_REPORT_STEP).float().mean()  # round 1's running mean at t=32
    assert metrics["predictor/live_mae_naive_plp32"] == pytest.approx((remaining - naive).abs().mean().item())
    assert [p for p, _ in table] == pytest.approx([known] * len(prompts))
    assert {"predictor/live_mae_history_plp32", "predictor/live_mae_sibling_plp32", "predictor/live_kendall_plp32",
            "predictor/live_mae_median_static", "predictor/mae_plp32"} <= set(metrics)


def test_the_scheduler_acts_on_the_estimate_with_the_lowest_recent_live_error(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from rl_lenbalance.config import LenBalanceConfig
    from rl_lenbalance.generation.engine import SELECTION_ROUNDS, LenBalanceEngine, TrainingPairs
    from rl_lenbalance.predictor.context import CANDIDATES, ESTIMATES

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    engine = LenBalanceEngine(model, LenBalanceConfig(), 64)
    lengths = torch.tensor([40, 50, 60, 34, 36, 38, 60, 63])  # prompt k's rows: 2k, 2k+1, one generate call
    engine.baseline.update(lengths.tolist())  # a running mean and median to copy
    pairs = TrainingPairs.empty(8, 1, feature_size(model.config.hidden_size))
    pairs.row, pairs.prompt, pairs.length, pairs.wave = torch.arange(8), torch.arange(8) // 2, lengths, torch.zeros(8)
    live = torch.full((8, 3), float("nan"))
    live[:, 0] = 5.0  # the head read 5 tokens for every row at t=0: far off

    assert engine.chosen(0) == "head"  # nothing scored yet
    metrics = engine.score_live(torch.arange(8), live, lengths, pairs)
    errors = {name: metrics[f"predictor/live_mae_{name}_static" if name != "head" else "predictor/live_mae_static"]
              for name in CANDIDATES}
    assert errors["head"] == pytest.approx((lengths - 5.0).abs().mean().item())
    assert metrics["predictor/used_static"] == 0.0 and metrics["predictor/live_mae_used_static"] == errors["head"]
    best = min(errors, key=errors.get)
    assert best != "head" and engine.chosen(0) == best and engine.chosen(32) == "head"  # per step
    read = engine.read(torch.full((2,), 5.0), [0, 1], 0, [[], []])
    assert torch.equal(read, engine.context([0, 1], [0, 0], [[], []])[:, ESTIMATES.index(best)] * 64)
    resumed = LenBalanceEngine(model, LenBalanceConfig(), 64)
    resumed.load_state_dict(engine.state_dict())
    assert resumed.chosen(0) == best

    live[:, 0] = lengths.float()  # now the head is exact: once its bad round leaves the window, it drives again
    used = engine.score_live(torch.arange(8), live, lengths, pairs)["predictor/used_static"]
    assert used == CANDIDATES.index(best)  # this round acted on the choice the bad round made
    for _ in range(SELECTION_ROUNDS - 1):
        engine.score_live(torch.arange(8), live, lengths, pairs)
    assert engine.chosen(0) == "head"
    assert torch.equal(engine.read(torch.full((2,), 5.0), [0, 1], 0, [[], []]), torch.full((2,), 5.0))


def test_the_choice_skips_unscored_rounds_and_never_picks_a_candidate_never_scored():
    from rl_lenbalance.generation.engine import lowest_mean_error

    nan = float("nan")
    assert lowest_mean_error([[9.0, 4.0, nan], [9.0, nan, nan]]) == 1  # mean 4 over the one round that scored it
    assert lowest_mean_error([[9.0, 4.0, nan], [1.0, 8.0, nan]]) == 0  # means 5 and 6; column 2 never scored
    assert lowest_mean_error([[nan, nan, 3.0]]) == 2


def test_group_median_targets_replace_only_the_t0_samples_with_the_prompts_median_length():
    from rl_lenbalance.generation.engine import TrainingPairs, group_median_targets

    pairs = TrainingPairs.empty(entries=5, samples=2, width=1)
    pairs.row[:4] = torch.tensor([0, 1, 2, 2])  # row 2 re-bucketed: two entries, one length
    pairs.prompt[:4], pairs.length[:4] = torch.tensor([7, 7, 7, 7]), torch.tensor([10, 40, 100, 100])
    pairs.row[4], pairs.prompt[4], pairs.length[4] = 3, 9, 5
    pairs.step[:] = torch.tensor([0, 8, 0, -1, 0, 32, 40, -1, 0, -1])
    pairs.y[:] = torch.tensor([10.0, 2.0, 40.0, -1.0, 100.0, 68.0, 60.0, -1.0, 5.0, -1.0])
    targets = group_median_targets(pairs)
    assert targets.tolist() == [40.0, 2.0, 40.0, -1.0, 40.0, 68.0, 60.0, -1.0, 5.0, -1.0]  # median of 10, 40, 100
