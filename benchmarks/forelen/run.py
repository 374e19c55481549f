"""`bench run`: train every predictor on each scenario's train split, score it on the test split, write the JSON,
the table and the figure."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from rl_lenbalance.predictor import PLPHead, bin_index, soft_labels

from .config import RunConfig
from .cost import step_cost
from .dataset import SPLITS, BenchData, check_compatible, model_id, scenario_dir
from .metrics import mae, summary
from .online import online_vs_offline
from .predictors import PREDICTORS, make_pairs, plp_head
from .report import plot_curves, table, targets
from .train import FitSettings, score, train_predictor


def summarize(data: BenchData) -> dict:
    """Size and length distribution of one scenario's data set."""
    lengths = data.lengths.float()
    return {
        "completions": len(lengths),
        "prompts": {s: int((data.prompt_split == i).sum()) for i, s in enumerate(SPLITS)},
        "samples_per_prompt": data.meta["samples_per_prompt"], "max_new_tokens": data.max_length,
        "length_mean": lengths.mean().item(), "length_median": lengths.median().item(),
        "length_p90": lengths.quantile(0.9).item(),
        "capped_pct": 100 * (lengths >= data.max_length).float().mean().item(),
        "model": data.meta["model"], "feature_layer": data.meta["feature_layer"],
        "trail_layer": data.meta["trail_layer"],
    }


def mean_over_seeds(runs: list[dict[int, dict]]) -> dict[int, dict]:
    out = {}
    for t in runs[0]:
        taus = [r[t]["kendall_tau"] for r in runs if r[t]["kendall_tau"] is not None]
        out[t] = {"mae": statistics.mean(r[t]["mae"] for r in runs), "mae_seeds": [r[t]["mae"] for r in runs],
                  "mae_se": statistics.mean(r[t]["mae_se"] for r in runs),
                  "kendall_tau": statistics.mean(taus) if taus else None, "n": runs[0][t]["n"]}
    return out


def static_as_remaining(model, data: BenchData) -> dict[int, dict]:
    """EGTP static's prediction read as remaining length max(ŷ - t, 0), on the completions alive at each t."""
    spec, out = PREDICTORS["egtp"], {}
    pairs = make_pairs(data, spec.features, data.rows("test"), data.steps)
    for t in data.steps:
        at = pairs.at(t)
        if len(at.y):
            predicted = (model.predict(at.x) - t).clamp(min=0)
            out[t] = summary(predicted, at.y)
    return out


def readout_floor(data: BenchData) -> float:
    """Test MAE the PLP head would keep if it predicted every completion's soft label exactly, its bins' read-out
    values learnt from the train split: the error of reading out one value per bin."""
    head = plp_head(data, 0)
    train = data.lengths[data.rows("train")].float()
    head.observe(bin_index(train, head.edges), train)
    lengths = data.lengths[data.rows("test")].float()
    return mae(head.readout(soft_labels(bin_index(lengths, head.edges), head.config.num_bins)), lengths)


def score_scenario(data: BenchData, config: RunConfig, saved_head: PLPHead | None, log) -> dict:
    """Every configured predictor (mean over seeds), the saved head if any, online vs offline, and the cost."""
    names = config.predictors or tuple(PREDICTORS)
    result: dict = {"data": summarize(data), "predictors": {}, "plp_readout_floor_mae": readout_floor(data)}
    for name in names:
        spec, runs, extra = PREDICTORS[name], [], []
        for seed in range(config.seeds):
            settings = FitSettings(config.epochs, config.batch_size, config.lr, seed)
            model = train_predictor(spec, data, settings)
            runs.append(score(spec, model, data))
            if name == "egtp":
                extra.append(static_as_remaining(model, data))
        result["predictors"][name] = {"family": spec.family, "description": spec.description,
                                      "steps": mean_over_seeds(runs)}
        if extra:
            result["predictors"]["egtp-as-remaining"] = {
                "family": "prompt only", "description": "EGTP static read as remaining length max(ŷ - t, 0)",
                "steps": mean_over_seeds(extra)}
        log(f"[bench run] {data.meta['scenario']}: {name}: "
            + ", ".join(f"t={t} MAE {v['mae']:.1f}" for t, v in result["predictors"][name]["steps"].items()))
    if saved_head is not None:
        result["saved_head"] = {"path": config.predictor_path, "steps": score(PREDICTORS["plp"], saved_head, data)}
    if "plp" in names:
        result["online_vs_offline"] = online_vs_offline(data, config.round_prompts,
                                                        FitSettings(config.epochs, config.batch_size, config.lr))
    result["cost"] = step_cost(data)
    return result


def run(config: RunConfig, data_root: str | Path, out_dir: str | Path, command: str | None = None, log=None
        ) -> list[Path]:
    """Score every configured scenario; write predictor_benchmark.json, predictor_table.md and
    predictor_mae_vs_tokens.png into `out_dir`; returns their paths."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start, results = time.perf_counter(), {}
    datasets = {s: BenchData.load(scenario_dir(data_root, s)) for s in config.scenarios}
    saved_head = PLPHead.from_pretrained(config.predictor_path) if config.predictor_path else None
    for data in datasets.values():  # before any training: refuse a data set made for another policy
        check_compatible(data.meta, model_id(config.model), config.feature_layer)
        if saved_head is not None:
            check_compatible(data.meta, data.meta["model"], saved_head.config.feature_layer,
                             saved_head.config.hidden_size)
    for scenario, data in datasets.items():
        results[scenario] = score_scenario(data, config, saved_head, log)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"command": command,
              "run_seconds": time.perf_counter() - start, "seeds": config.seeds, "epochs": config.epochs,
              "targets": targets(results), "scenarios": results}
    paths = [out_dir / "predictor_benchmark.json", out_dir / "predictor_table.md"]
    paths[0].write_text(json.dumps(report, indent=1))
    paths[1].write_text(table(results) + "\n")
    paths.append(plot_curves(results, out_dir / "predictor_mae_vs_tokens.png"))
    return paths
