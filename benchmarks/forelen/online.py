"""Online vs offline: the head trained as in the GRPO loop (rounds of fresh rollouts, replay buffer, a few AdamW
steps per round, the engine's default settings) against the same head trained offline on the same data; and the
replay of rounds saved from the real trainer (`benchmarks/predictor_online.py`) through fresh engines."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rl_lenbalance.config import LenBalanceConfig
from rl_lenbalance.generation.engine import (
    PLP_REPORT_STEP,
    LenBalanceEngine,
    TrainingPairs,
    head_config,
    lowest_mean_error,
    new_trainer,
)
from rl_lenbalance.predictor import PLPHead, feature_size
from rl_lenbalance.predictor.context import CANDIDATES

from .dataset import BenchData
from .metrics import mae
from .predictors import PREDICTORS, Pairs, make_pairs
from .train import FitSettings, fit_head, score, train_predictor

REPORT_STEPS = (0, 32)


def train_online(data: BenchData, round_prompts: int, seed: int) -> tuple[PLPHead, list[dict]]:
    """Feed the train prompts (seeded order) in rounds of `round_prompts` prompts with all their completions; before
    each round's update, record the head's honest error on that round at t = 0 and t = 32, as the engine does."""
    lb = LenBalanceConfig()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        lb = replace(lb, feature_layer=int(data.meta["feature_layer"]), context_features=False)  # no prompts
        head = PLPHead(head_config(lb, int(data.meta["hidden_size"]), data.max_length)).eval()
        trainer = new_trainer(head, lb, seed)
        train_prompts = torch.unique(data.sample_prompt[data.rows("train")])
        order = train_prompts[torch.randperm(len(train_prompts), generator=torch.Generator().manual_seed(seed))]
        history = []
        for i in range(0, len(order), round_prompts):
            rows = torch.nonzero(torch.isin(data.sample_prompt, order[i : i + round_prompts])).flatten()
            pairs = make_pairs(data, PREDICTORS["plp"].features, rows, data.steps)
            honest = {f"mae@{t}": trainer.mean_abs_error(pairs.at(t).x, pairs.at(t).y)
                      for t in REPORT_STEPS if len(pairs.at(t).y)}
            trainer.observe(pairs.x, pairs.y)
            history.append({"round": len(history), "completions": len(rows), **honest})
    return head, history


def online_vs_offline(data: BenchData, round_prompts: int, settings: FitSettings) -> dict:
    """Test MAE per step of the online head and of the offline PLP head, and the relative gap."""
    spec = PREDICTORS["plp"]
    online_head, history = train_online(data, round_prompts, settings.seed)
    online = score(spec, online_head, data)
    offline = score(spec, train_predictor(spec, data, settings), data)
    test = make_pairs(data, spec.features, data.rows("test"), data.steps)
    return {
        "rounds": len(history),
        "round_prompts": round_prompts,
        "settings": "LenBalanceConfig defaults (lr, buffer, batch, steps per round)",
        "online_mae": {t: online[t]["mae"] for t in online},
        "offline_mae": {t: offline[t]["mae"] for t in offline},
        "gap_pct": {t: 100 * (online[t]["mae"] / offline[t]["mae"] - 1) for t in online if t in offline},
        "online_mae_all_steps": mae(online_head.predict(test.x), test.y),
        "honest_round_mae": history,
    }


VARIANTS = {"plp": LenBalanceConfig(context_features=False), "plp_context": LenBalanceConfig(context_features=True),
            "plp_context_group_median": LenBalanceConfig(context_features=True, static_target="group_median")}
# head inputs tried besides the final hidden state's PLP features (issue 22 item 3), each with context features:
# "final" (what the trainer recorded), "layerN" (the same PLP features of decoder layer N), "entropy" (`entropy_trend`)
FEATURE_VARIANTS = {"layer15": ("layer15",), "layer22": ("layer22",), "layer15+final": ("layer15", "final"),
                    "final+entropy": ("final", "entropy")}
SUMMARY_ROUNDS = range(10, 20)  # rounds 11-20, counted from 1
ENTROPY_SCALE = 5.0  # nats (a uniform choice among ~150 tokens)
OFFLINE_TRAIN_ROUNDS = (3, 6, 9)  # the offline head's training rounds, for its learning curve (is data the limit?)


def load_round(saved: dict) -> tuple[TrainingPairs, int, dict]:
    """A round saved by `benchmarks/predictor_online.py` (`torch.load`ed): its training pairs (features as float32),
    its max completion length and the other layers' features and token entropies saved beside it (empty in rounds
    saved without them)."""
    pairs = {k: v.float() if v.is_floating_point() else v for k, v in saved["pairs"].items()}
    if "wave" not in pairs:  # saved before rows carried their first wave: one process, one wave (`with_features`)
        pairs["wave"] = torch.where(pairs["row"] >= 0, 0, -1)
    return TrainingPairs(**pairs), int(saved["max_length"]), saved.get("extra", {})


def entropy_trend(entropy: torch.Tensor, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """(N, 4) per (row, step): the mean entropy of the tokens drawn before `step`, of the last 8 of them, their
    maximum and the last one, over `ENTROPY_SCALE`; zeros at step 0. `entropy`: (B, W), NaN past a row's end (a
    row running at `step` drew every token before it)."""
    drawn = entropy.float().nan_to_num(0.0)
    total = torch.cat([torch.zeros(len(drawn), 1), drawn.cumsum(1)], 1)  # total[:, t]: the first t tokens' sum
    seen = steps.clamp(min=1, max=drawn.size(1))  # tokens drawn before `step` (0 zeroed below; a step past every
    # row's end, the probe of a round shorter than it, reads the last token: no row runs there, its pair is unused)
    recent, last = seen.clamp(max=8), seen - 1
    out = torch.stack([total[rows, seen] / seen, (total[rows, seen] - total[rows, seen - recent]) / recent,
                       drawn.cummax(1).values[rows, last], drawn[rows, last]], 1)
    return torch.where((steps > 0).unsqueeze(1), out / ENTROPY_SCALE, 0.0)


def with_features(pairs: TrainingPairs, extra: dict, parts: tuple[str, ...]) -> TrainingPairs:
    """`pairs` whose head inputs (t=0, t=32 and the samples) are `parts` concatenated (see `FEATURE_VARIANTS`).
    Row id r is the round's completion r (one process: the saved rounds' layout), whichever waves hold its entries
    (a re-bucketed row has one in the probe's wave and one in its continuation's)."""
    first = next(iter(extra.values()))  # (B, W) entropies, or a layer's {step: (B, F)}
    batch = (first if isinstance(first, torch.Tensor) else next(iter(first.values()))).size(0)
    if int(pairs.row.max()) >= batch:
        raise ValueError(f"with_features reads rounds of one process: row ids 0..{batch - 1}, "
                         f"got {int(pairs.row.max())}")
    samples = len(pairs.y) // len(pairs.row)
    rows = pairs.row.clamp(min=0)

    def inputs(recorded: torch.Tensor, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        columns = []
        for part in parts:
            if part == "final":
                columns.append(recorded)
            elif part == "entropy":
                columns.append(entropy_trend(extra["entropy"], rows, steps))
            else:  # "layerN": the PLP features of layer N recorded at each step (zeros at a step never recorded)
                layer = extra[part]
                recorded_steps = sorted(layer)
                table = torch.stack([layer[step].float() for step in recorded_steps])  # (steps, B, F)
                index = torch.searchsorted(torch.tensor(recorded_steps), steps).clamp(max=len(recorded_steps) - 1)
                known = torch.tensor(recorded_steps)[index] == steps
                columns.append(table[index, rows] * known.unsqueeze(1))
        return torch.cat(columns, 1)

    entries = torch.zeros(len(rows), dtype=torch.long)
    return replace(pairs, z0=inputs(pairs.z0, rows, entries), z32=inputs(pairs.z32, rows, entries + PLP_REPORT_STEP),
                   z=inputs(pairs.z, rows.repeat_interleave(samples), pairs.step.clamp(min=0)))


def stand_in(hidden_size: int) -> LlamaForCausalLM:
    """A one-layer causal LM of the policy's hidden size: an engine needs a model to hook, a replay reads none."""
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden_size, intermediate_size=8, num_hidden_layers=1,
                                        num_attention_heads=1, num_key_value_heads=1, vocab_size=8))


def replay_rounds(rounds: list[TrainingPairs], max_length: int, config: LenBalanceConfig, seed: int,
                  hidden: int | None = None
                  ) -> tuple[list[dict[str, float]], LenBalanceEngine, list[tuple[torch.Tensor, ...]]]:
    """Each round's metrics from a fresh engine learning the saved rounds in order, exactly as the trainer's engine
    did (score before learning, then `learn`); and per round the head's inputs (samples, t=0, t=32) with targets.
    Inputs wider than one layer's PLP features (`with_features`) need the policy's `hidden` size."""
    hidden = hidden or (rounds[0].z0.size(1) - 2) // 3
    engine = LenBalanceEngine(stand_in(hidden), config, max_length, seed)
    extra = rounds[0].z0.size(1) - feature_size(hidden)
    if extra:  # a head reading those extra columns, trained as the engine's own
        engine.head = PLPHead(replace(engine.head.config, extra_features=extra)).eval()
        engine.trainer = new_trainer(engine.head, config, seed)
    metrics, inputs = [], []
    for pairs in rounds:
        x0, x32, x = engine.round_inputs(pairs)
        inputs.append((x, pairs.y, x0, pairs.y0, x32, pairs.y32))
        metrics.append(engine.learn(pairs, pairs.length[pairs.row >= 0]))
    return metrics, engine, inputs


def offline_mae(engine: LenBalanceEngine, inputs: list[tuple[torch.Tensor, ...]], seed: int,
                train_rounds: int = SUMMARY_ROUNDS.start - 1) -> dict[str, float]:
    """The same head trained offline (best epoch on round 10) on rounds 1-`train_rounds`, scored on rounds 11-20 at
    t=0 and t=32."""
    def pairs(x: torch.Tensor, y: torch.Tensor) -> Pairs:
        keep = y >= 0
        return Pairs(x[keep], torch.zeros(int(keep.sum())), y[keep], torch.zeros(int(keep.sum())))

    train = [pairs(*r[:2]) for r in inputs[:train_rounds]]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = PLPHead(engine.head.config)
        fit_head(head, Pairs(*(torch.cat([getattr(p, f) for p in train]) for f in ("x", "t", "y", "row"))),
                 pairs(*inputs[SUMMARY_ROUNDS.start - 1][:2]), FitSettings(epochs=30, batch_size=256, seed=seed))
    out = {}
    for label, k in (("static", 2), ("plp32", 4)):
        test = [pairs(*r[k : k + 2]) for r in inputs[SUMMARY_ROUNDS.start : SUMMARY_ROUNDS.stop]]
        out[f"offline_mae_{label}"] = sum(mae(head.predict(p.x), p.y) for p in test) / len(test)
    return out


def running_median_mae(rounds: list[TrainingPairs], step: int) -> list[float]:
    """Per round from the second: the MAE of the median of (L - step) over earlier rounds' lengths L > step, on this
    round's rows still running at `step`. The MAE-optimal constant, as the naive baseline is the mean one: with half
    the running rows capped, the two differ (a reference for the head, not an estimate the engine uses)."""
    out, past = [], []
    for pairs in rounds:
        lengths = pairs.length[pairs.row >= 0].float()
        remaining = lengths[lengths > step] - step
        if past and len(remaining):
            seen = torch.cat(past)
            out.append((remaining - (seen[seen > step] - step).median()).abs().mean().item())
        past.append(lengths)
    return out


def length_profile(rounds: list[TrainingPairs], max_length: int) -> dict[str, float]:
    """How the stream's completions end: the share that ran to `max_length`, the share still running at t=32, and
    among those the share that ran to the cap (what a prediction at t=32 mostly has to tell)."""
    lengths = torch.cat([pairs.length[pairs.row >= 0] for pairs in rounds])
    running = lengths > PLP_REPORT_STEP
    return {"capped": (lengths >= max_length).float().mean().item(), "running_at_32": running.float().mean().item(),
            "capped_among_running_at_32": (lengths[running] >= max_length).float().mean().item()}


LIVE_WINDOWS = {"rounds_6_10": range(5, 10), "rounds_11_20": SUMMARY_ROUNDS}  # 0-based round indices


def live_summary(logged: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """The live metrics the trainer logged (`LenBalanceEngine.score_live`), averaged over each window of
    `LIVE_WINDOWS` that the run covers, with the targets of issue 29 worked out: the estimate the scheduler used
    against the best simple one and the running median, the head at the probe against the survival-conditioned
    running mean (`naive`), and the head at t=0 against naive."""
    out = {}
    for name, window in LIVE_WINDOWS.items():
        rounds = [logged[i] for i in window if i < len(logged)]
        if len(rounds) < len(window):
            continue
        keys = sorted({k for m in rounds for k in m if k.startswith(("predictor/live_", "predictor/used_"))})
        finite = {k: [m[k] for m in rounds if k in m and math.isfinite(m[k])] for k in keys}  # τ is NaN on ties
        mean = {k.removeprefix("predictor/"): sum(v) / len(v) for k, v in finite.items() if v}
        for label in ("static", f"plp{PLP_REPORT_STEP}"):
            head = mean.get(f"live_mae_{label}")
            if head is None:
                continue
            simple = {e: mean[f"live_mae_{e}_{label}"] for e in ("naive", "history", "sibling", "median")
                      if f"live_mae_{e}_{label}" in mean}
            best = min(simple, key=simple.get)
            used = mean[f"live_mae_used_{label}"]
            mean |= {f"{label}_head_below_naive_pct": 100 * (1 - head / simple["naive"]),
                     f"{label}_best_simple": best,
                     f"{label}_head_over_best_simple_pct": 100 * (head / simple[best] - 1),
                     f"{label}_used_over_median_pct": 100 * (used / simple["median"] - 1),
                     f"{label}_used_over_best_simple_pct": 100 * (used / simple[best] - 1)}
        out[name] = mean | {"used_mae_by_selection_window": selection_by_window(logged, window)}
    return out


SELECTION_WINDOWS = (1, 3, 5, 10, 20)


def selection_by_window(logged: list[dict[str, float]], window: range) -> dict[str, dict[int, float]]:
    """Per step label, the live MAE over `window` (0-based rounds) of the estimate a scheduler would have acted on had
    it chosen, as `LenBalanceEngine.chosen` does, the candidate with the lowest mean live MAE over the last W scored
    rounds (from round 2), for each W of `SELECTION_WINDOWS`: from the trainer's logged live errors of every
    candidate, which do not depend on the choice (the rule is `engine.lowest_mean_error`, as the trainer's)."""
    out: dict[str, dict[int, float]] = {}
    for label in ("static", f"plp{PLP_REPORT_STEP}"):
        keys = [f"predictor/live_mae_{label}" if name == "head" else f"predictor/live_mae_{name}_{label}"
                for name in CANDIDATES]
        rows = [[m.get(k) for k in keys] for m in logged]
        scored = [i for i in range(1, len(rows)) if None not in rows[i]]
        if not all(i in scored for i in window if i < len(rows)):
            continue
        out[label] = {}
        for w in SELECTION_WINDOWS:
            used = []
            for i in window:
                past = [rows[j] for j in scored if j < i][-w:]
                used.append(rows[i][lowest_mean_error(past) if past else CANDIDATES.index("head")])
            out[label][w] = sum(used) / len(used)
    return out


def evaluate_rounds(folder: Path, setting: str, seed: int = 0, only: list[str] | None = None) -> dict:
    """Every saved round of one prompt setting replayed through each head variant (`only`: these names); rounds
    11-20 averaged; the offline head beside the online one; and what the trainer itself logged each round."""
    files = sorted(folder.glob("round_*.pt"))
    saved = [torch.load(path, weights_only=True) for path in files]
    loaded = [load_round(round_) for round_ in saved]
    rounds, max_length = [pairs for pairs, _, _ in loaded], loaded[0][1]
    hidden = (rounds[0].z0.size(1) - 2) // 3
    variants = dict(VARIANTS)
    if all(extra for _, _, extra in loaded):
        variants |= {f"context_{name}": (parts, LenBalanceConfig(context_features=True))
                     for name, parts in FEATURE_VARIANTS.items()}
    if only is not None:
        variants = {name: spec for name, spec in variants.items() if name in only}
    logged = [round_["trainer_metrics"] for round_ in saved]
    report: dict = {"setting": setting, "task": saved[0].get("task", "arithmetic"), "rounds": len(rounds),
                    "completions_per_round": [int((p.row >= 0).sum()) for p in rounds],
                    "distinct_prompts": len({int(k) for p in rounds for k in p.prompt}),
                    "live": live_summary(logged), "trainer_logged": logged, "variants": {}}
    for name, spec in variants.items():
        parts, config = spec if isinstance(spec, tuple) else (("final",), spec)
        replayed = [with_features(p, extra, parts) for p, _, extra in loaded] if parts != ("final",) else rounds
        metrics, engine, inputs = replay_rounds(replayed, max_length, config, seed, hidden)
        summary_rounds = [m for i, m in enumerate(metrics) if i in SUMMARY_ROUNDS]
        keys = sorted({k for m in summary_rounds for k in m if "mae" in k or "kendall" in k})
        variant = {"per_round": [{k: v for k, v in m.items() if "mae" in k or "kendall" in k} for m in metrics]}
        if summary_rounds:
            variant["rounds_11_20"] = {k: sum(m[k] for m in summary_rounds if k in m)
                                       / sum(k in m for m in summary_rounds) for k in keys}
            variant["rounds_averaged"] = [i + 1 for i in SUMMARY_ROUNDS if i < len(metrics)]
        if len(rounds) >= SUMMARY_ROUNDS.stop:
            variant["rounds_11_20"] |= offline_mae(engine, inputs, seed)
            variant["offline_by_train_rounds"] = {k: offline_mae(engine, inputs, seed, k) for k in OFFLINE_TRAIN_ROUNDS}
        report["variants"][name] = variant
    window = slice(SUMMARY_ROUNDS.start - 1, SUMMARY_ROUNDS.stop - 1)  # the list starts at round 2
    report["running_median_rounds_11_20"] = {
        label: sum(maes[window]) / len(maes[window]) for label, maes in (
            ("static", running_median_mae(rounds, 0)), ("plp32", running_median_mae(rounds, PLP_REPORT_STEP)))
        if maes[window]}
    report["length_profile"] = length_profile(rounds, max_length)
    report["plp_report_step"] = PLP_REPORT_STEP
    if len(rounds) < SUMMARY_ROUNDS.stop:
        report["note"] = (f"only {len(rounds)} of {SUMMARY_ROUNDS.stop} rounds ran (time); 'rounds_11_20' averages "
                          "the rounds in 'rounds_averaged', and the offline head is not trained")
    return report
