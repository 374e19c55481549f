"""Would early re-bucketing pay? Decode steps of memory-limited waves on real SmolLM2 lengths and real predictions.

On a GPU a decode step costs about the same for 1 or 512 rows (DESIGN.md), so the time of generation in waves is the
sum over waves of the wave's longest completion. This script counts those steps for the test split of the predictor
benchmark's data (`python -m benchmarks.forelen build`), with the benchmark's EGTP (prompt-only) and PLP heads trained
on its train split, for these schedules of the same completions:

- stock: TRL's order (the completions of a prompt side by side), cut into waves;
- static: longest EGTP prediction first;
- rebucket@k: every row first decodes a probe of k tokens in waves (stock order), then the rows still running are
  regrouped, longest PLP prediction first (the continuation re-prefills prompt + k tokens; not counted here);
- rebucket_oracle@k: the same with the true remaining lengths; oracle: longest true length first.

It is a count, not a timing: it says how much of the oracle's saving each predictor could capture.

    python benchmarks/rebucket_sim.py --out docs/benchmarks/rebucket_sim_cpu.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.forelen.dataset import BenchData
from benchmarks.forelen.predictors import PREDICTORS, make_pairs
from benchmarks.forelen.train import FitSettings, predict, train_predictor
from rl_lenbalance.builtin.models import default_cache_dir


def wave_steps(lengths: Sequence[int], order: Sequence[int], wave: int) -> int:
    """Decode steps of `generate` called on consecutive waves of `order`: each wave runs until its longest row ends."""
    return sum(max(lengths[i] for i in order[k:k + wave]) for k in range(0, len(order), wave))


def longest_first(keys: Sequence[float], rows: Sequence[int]) -> list[int]:
    return sorted(rows, key=lambda i: (-keys[i], i))


def schedules(lengths: list[int], static: list[float], plp_total: list[float], wave: int, probe: int) -> dict[str, int]:
    rows = list(range(len(lengths)))
    probe_steps = wave_steps([min(n, probe) for n in lengths], rows, wave)
    alive = [i for i in rows if lengths[i] > probe]
    remaining = [max(n - probe, 0) for n in lengths]
    return {
        "stock": wave_steps(lengths, rows, wave),
        "static": wave_steps(lengths, longest_first(static, rows), wave),
        f"rebucket@{probe}": probe_steps + wave_steps(remaining, longest_first(plp_total, alive), wave),
        f"rebucket_oracle@{probe}": probe_steps + wave_steps(remaining, longest_first(lengths, alive), wave),
        "oracle": wave_steps(lengths, longest_first(lengths, rows), wave),
    }


def scenario(data: BenchData, waves: Sequence[int], probe: int, seed: int) -> dict:
    settings = FitSettings(seed=seed)
    rows = data.rows("test")
    lengths = data.lengths[rows].tolist()
    egtp, plp = (PREDICTORS[name] for name in ("egtp", "plp"))
    static_pairs = make_pairs(data, egtp.features, rows, (0,))
    static = predict(train_predictor(egtp, data, settings), static_pairs).tolist()
    plp_pairs = make_pairs(data, plp.features, rows, (probe,))
    plp_total = [0.0] * len(rows)
    position = {int(r): i for i, r in enumerate(rows)}
    for r, value in zip(plp_pairs.row.tolist(), predict(train_predictor(plp, data, settings), plp_pairs).tolist()):
        plp_total[position[r]] = probe + value
    result = {"rows": len(rows), "capped": sum(n >= data.max_length for n in lengths), "probe": probe}
    for wave in waves:
        steps = schedules(lengths, static, plp_total, wave, probe)
        gain = steps["stock"] - steps["oracle"]
        result[f"wave_{wave}"] = {"decode_steps": steps, "fraction_of_oracle_saving": {
            k: round((steps["stock"] - v) / gain, 3) if gain else None for k, v in steps.items()}}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(default_cache_dir() / "bench" / "full"))
    p.add_argument("--scenarios", nargs="+", default=["rl", "reasoning", "long"])
    p.add_argument("--waves", type=int, nargs="+", default=[8, 16])
    p.add_argument("--probe", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    results = {"command": "python benchmarks/rebucket_sim.py " + " ".join(f"--{k} {v}" for k, v in (
        ("waves", " ".join(map(str, args.waves))), ("probe", args.probe), ("seed", args.seed), ("out", args.out)))}
    for name in args.scenarios:
        results[name] = scenario(BenchData.load(Path(args.data) / name), args.waves, args.probe, args.seed)
        print(name, json.dumps(results[name]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
