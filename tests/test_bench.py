"""The ForeLen-style benchmark: every predictor learns a synthetic stream whose length is a function of its features,
the data set round-trips, bad names and mismatched policies fail clearly, and the small build runs end to end."""

import json

import pytest
import torch

from benchmarks.forelen import BenchData, BuildConfig, RunConfig, check_compatible
from benchmarks.forelen.cli import main
from benchmarks.forelen.dataset import STEPS
from benchmarks.forelen.metrics import kendall_tau
from benchmarks.forelen.online import entropy_trend, live_summary, online_vs_offline, running_median_mae, with_features
from benchmarks.forelen.predictors import PREDICTORS
from benchmarks.forelen.run import run
from benchmarks.forelen.train import FitSettings, score, train_predictor
from rl_lenbalance.predictor import POOLING_METHODS, HeadConfig, PLPHead, StreamingPool, plp_features

HIDDEN, PROXY, MAX_LEN, K = 16, 8, 160, 2


def synthetic(prompts: int = 240, seed: int = 0) -> BenchData:
    """A stream where length = f(prompt latent u) + g(sample latent v): every feature carries u through a random
    projection (plus noise), and what a completion's generated tokens show (PLP, TRAIL at t > 0) also carries v and,
    as real hidden states do, the position t."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(prompts, 4, generator=g), torch.randn(prompts * K, 4, generator=g)
    sample_prompt = torch.arange(prompts).repeat_interleave(K)
    lengths = (20 + 100 * torch.sigmoid(1.5 * u[:, 0] - u[:, 1])[sample_prompt] + 60 * torch.sigmoid(2 * v[:, 0]))
    lengths = lengths.round().clamp(max=MAX_LEN).int()

    def project(x: torch.Tensor, width: int) -> torch.Tensor:
        return x @ torch.randn(x.size(1), width, generator=g) + 0.1 * torch.randn(len(x), width, generator=g)

    prompt_state = project(u, HIDDEN)
    pooled = torch.stack([prompt_state + 0.1 * torch.randn(prompts, HIDDEN, generator=g) for _ in POOLING_METHODS], 1)
    token_state = project(torch.cat([u[sample_prompt], v], 1), HIDDEN)
    plp = torch.zeros(len(lengths), len(STEPS), 3 * HIDDEN + 2)
    trail = torch.zeros(len(lengths), len(STEPS), HIDDEN)
    trail[:, 0] = project(u, HIDDEN)[sample_prompt]
    position = torch.randn(HIDDEN, generator=g)
    for j, t in enumerate(STEPS):
        pool = None
        if t:
            state = token_state + 3 * t / MAX_LEN * position
            pool = StreamingPool(len(lengths), HIDDEN)
            pool.update(state + 0.1 * torch.randn(len(lengths), HIDDEN, generator=g), torch.rand(len(lengths)))
            trail[:, j] = state
        plp[:, j] = plp_features(pooled[sample_prompt, 0], pool, t, MAX_LEN)
    split = torch.tensor([0, 0, 0, 1, 2], dtype=torch.int8).repeat(prompts // 5)
    meta = {"model": "synthetic", "feature_layer": -1, "hidden_size": HIDDEN, "trail_layer": 0, "scenario": "rl",
            "samples_per_prompt": K, "max_new_tokens": MAX_LEN, "batch_size": 8, "torch_threads": 1,
            "proxy_seconds_per_prompt": 0.001, "timing": {"seconds": 1.0, "hook_seconds": 0.01, "steps": 10}}
    return BenchData(meta=meta, prompts=[f"prompt {i}" for i in range(prompts)], prompt_split=split,
                     prompt_ids=torch.zeros(prompts, 1, dtype=torch.int32), pooled=pooled.half(),
                     proxy=project(u, PROXY).half(), sample_prompt=sample_prompt, lengths=lengths,
                     completion_ids=torch.zeros(len(lengths), 1, dtype=torch.int32), plp=plp.half(), trail=trail.half())


@pytest.fixture(scope="module")
def data() -> BenchData:
    return synthetic()


@pytest.fixture(scope="module")
def scores(data) -> dict:
    settings = FitSettings(epochs=40, batch_size=64, lr=3e-3)
    return {name: score(spec, train_predictor(spec, data, settings), data) for name, spec in PREDICTORS.items()}


@pytest.mark.parametrize("name", [n for n in PREDICTORS if n != "constant"])
def test_every_predictor_beats_the_constant_baseline(scores, name):
    constant = scores["constant"]
    for t, entry in scores[name].items():
        assert entry["mae"] < 0.8 * constant[t]["mae"], (name, t, entry["mae"], constant[t]["mae"])
        assert entry["kendall_tau"] > 0.3, (name, t, entry["kendall_tau"])


def test_progressive_predictors_use_the_generated_tokens(scores):
    # v (half the spread of the lengths) shows only in the generated tokens: PLP and TRAIL must see it
    assert scores["plp"][8]["mae"] < 0.85 * scores["egtp"][0]["mae"]
    assert scores["trail"][8]["mae"] < 0.85 * scores["trail"][0]["mae"]


def test_online_head_learns_in_rounds_close_to_offline(data):
    result = online_vs_offline(data, round_prompts=16, settings=FitSettings(epochs=40, lr=3e-3))
    assert result["rounds"] == 144 // 16
    constant = score(PREDICTORS["constant"], train_predictor(PREDICTORS["constant"], data, FitSettings()), data)
    assert result["online_mae"][32] < 0.8 * constant[32]["mae"]
    assert {"mae@0", "mae@32"} <= set(result["honest_round_mae"][-1])
    assert result["honest_round_mae"][-1]["mae@0"] < result["honest_round_mae"][0]["mae@0"]


def test_kendall_tau():
    a = torch.arange(6.0)
    assert kendall_tau(a, a * 3) == pytest.approx(1.0)
    assert kendall_tau(a, -a) == pytest.approx(-1.0)
    assert kendall_tau(a, torch.ones(6)) is None
    assert kendall_tau(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 2, 3, 4])) == pytest.approx(5 / 30**0.5)


def test_data_set_round_trips(data, tmp_path):
    data.save(tmp_path / "rl")
    loaded = BenchData.load(tmp_path / "rl")
    assert loaded.meta == data.meta and loaded.prompts == data.prompts and loaded.steps == STEPS
    assert torch.equal(loaded.plp, data.plp) and loaded.plp.dtype == torch.float16
    assert torch.equal(loaded.rows("test"), data.rows("test"))
    splits = [set(data.sample_prompt[data.rows(s)].tolist()) for s in ("train", "val", "test")]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])  # split by prompt


def test_unknown_names_list_the_valid_ones(tmp_path, capsys):
    with pytest.raises(ValueError, match="valid predictors: constant, ssjf-reg"):
        RunConfig(predictors=("plp", "bert"))
    with pytest.raises(ValueError, match="'chat'.*valid scenarios: long, reasoning, rl"):
        RunConfig(scenarios=("chat",))
    with pytest.raises(ValueError, match="valid scenarios"):
        BuildConfig(scenarios=("rl", "code"))
    with pytest.raises(SystemExit):
        main(["run", "--data", str(tmp_path), "--predictors", "nope"])
    assert "invalid choice: 'nope' (choose from 'constant', 'ssjf-reg'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build", "--scenarios", "code"])
    assert "invalid choice: 'code' (choose from 'long', 'reasoning', 'rl')" in capsys.readouterr().err


def test_a_data_set_for_another_policy_is_refused(data, tmp_path):
    check_compatible(data.meta, "synthetic", -1, HIDDEN)
    with pytest.raises(ValueError, match="model: predictor 'other', data set 'synthetic'"):
        check_compatible(data.meta, "other", -1)
    with pytest.raises(ValueError, match="feature_layer: predictor 12, data set -1"):
        check_compatible(data.meta, "synthetic", 12)
    data.save(tmp_path / "data" / "rl")
    with pytest.raises(ValueError, match="feature_layer"):
        run(RunConfig(scenarios=("rl",), model="synthetic", feature_layer=5), tmp_path / "data", tmp_path / "out")
    head = PLPHead(HeadConfig(hidden_size=HIDDEN * 2, max_length=MAX_LEN))
    head.save_pretrained(tmp_path / "head")
    with pytest.raises(ValueError, match="hidden_size: predictor 32, data set 16"):
        run(RunConfig(scenarios=("rl",), predictors=("constant",), model="synthetic",
                      predictor_path=str(tmp_path / "head")), tmp_path / "data", tmp_path / "out")


def test_small_build_and_run_end_to_end(eos_tiny_model_dir, tmp_path):
    """The small version: a tiny model generates all three scenarios in seconds; `run` writes JSON, table, PNG."""
    main(["build", "--small", "--model", str(eos_tiny_model_dir), "--proxy-encoder", str(eos_tiny_model_dir),
          "--out", str(tmp_path / "data"), "--max-new-tokens", "72", "--threads", "1"])
    rl = BenchData.load(tmp_path / "data" / "rl")
    assert rl.meta["hidden_size"] == 64 and rl.meta["samples_per_prompt"] == 4 and len(rl.lengths) == 16
    assert rl.plp.shape == (16, len(STEPS), 3 * 64 + 2) and rl.trail.shape == (16, len(STEPS), 64)
    assert ((rl.lengths >= 1) & (rl.lengths <= 72)).all()
    main(["run", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--model",
          str(eos_tiny_model_dir), "--seeds", "1", "--epochs", "2"])
    report = json.loads((tmp_path / "out" / "predictor_benchmark.json").read_text())
    assert set(report["scenarios"]) == {"long", "reasoning", "rl"}
    assert set(PREDICTORS) <= set(report["scenarios"]["rl"]["predictors"])
    assert report["scenarios"]["rl"]["cost"]["model_step_ms"] > 0
    assert (tmp_path / "out" / "predictor_mae_vs_tokens.png").stat().st_size > 1000


def test_entropy_trend_reads_only_the_tokens_drawn_before_the_step():
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0] + [5.0] * 8, [0.5] * 3 + [float("nan")] * 9])
    rows, steps = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 2, 10, 3])
    scale = 5.0
    expected = torch.tensor([[0.0, 0.0, 0.0, 0.0],  # step 0: nothing drawn yet
                             [1.5, 1.5, 2.0, 2.0],  # tokens 1, 2: mean, mean of the last (up to) 8, max, last
                             [40 / 10, 37 / 8, 5.0, 5.0],  # tokens 1, 2, 3, 4, 5 x 6
                             [0.5, 0.5, 0.5, 0.5]])  # a row that ended at 3 tokens, read at step 3
    torch.testing.assert_close(entropy_trend(entropy, rows, steps), expected / scale)


def test_feature_variants_take_each_sample_from_its_row_and_step():
    from rl_lenbalance.generation.engine import TrainingPairs

    pairs = TrainingPairs.empty(entries=2, samples=2, width=3)
    pairs.row[:] = torch.tensor([0, 1])
    pairs.step[:] = torch.tensor([8, 0, 16, -1])  # the last sample unused
    layer = {step: torch.full((2, 3), float(step)) + torch.tensor([[0.0], [100.0]]) for step in (0, 8, 32)}
    out = with_features(pairs, {"layer5": layer}, ("layer5", "final"))
    assert out.z.shape == (4, 6) and out.z0.shape == (2, 6)
    assert out.z[:, 0].tolist() == [8.0, 0.0, 0.0, 100.0]  # row 0 at step 8 and 0; step 16 was never recorded: 0
    assert out.z32[:, 0].tolist() == [32.0, 132.0] and out.z0[:, 0].tolist() == [0.0, 100.0]
    torch.testing.assert_close(out.z[:, 3:], pairs.z)  # "final": the recorded features, unchanged


def test_running_median_scores_each_round_against_the_rounds_before():
    from rl_lenbalance.generation.engine import TrainingPairs

    rounds = []
    for lengths in ([10, 20, 60], [30, 40]):
        pairs = TrainingPairs.empty(entries=len(lengths), samples=1, width=1)
        pairs.row[:], pairs.length[:] = torch.arange(len(lengths)), torch.tensor(lengths)
        rounds.append(pairs)
    assert running_median_mae(rounds, 0) == [pytest.approx((10 + 20) / 2)]  # median 20 against 30 and 40
    assert running_median_mae(rounds, 15) == [pytest.approx((10 + 20) / 2)]  # of (5, 45): 5, against 15 and 25


def test_live_summary_averages_the_window_and_compares_the_estimate_used_with_the_simple_ones():
    def round_(head, naive, median, used):
        return {"predictor/live_mae_static": head, "predictor/live_mae_naive_static": naive,
                "predictor/live_mae_history_static": naive, "predictor/live_mae_sibling_static": naive,
                "predictor/live_mae_median_static": median, "predictor/live_mae_used_static": used,
                "predictor/used_static": 4.0, "predictor/mae_static": 99.0}

    logged = [round_(50.0, 50.0, 50.0, 50.0)] * 5 + [round_(30.0, 40.0, 20.0, 21.0), round_(34.0, 40.0, 24.0, 21.0)] * 2
    assert live_summary(logged) == {}  # 9 rounds: no window is whole
    summary = live_summary(logged + [round_(32.0, 40.0, 22.0, 21.0)])["rounds_6_10"]
    assert "mae_static" not in summary and summary["used_static"] == 4.0  # replay keys left out
    assert summary["live_mae_static"] == pytest.approx(32.0)
    assert summary["live_mae_median_static"] == pytest.approx(22.0)
    assert summary["static_head_below_naive_pct"] == pytest.approx(20.0)
    assert summary["static_best_simple"] == "median"
    assert summary["static_used_over_median_pct"] == pytest.approx(100 * (21 / 22 - 1))
    # choosing by every past round: the head in round 6 (all tied before), the median after: 30, 24, 20, 24, 22
    assert summary["used_mae_by_selection_window"]["static"][20] == pytest.approx(24.0)
