"""Benchmark outputs: the paper-shaped markdown table, the target checks, and the MAE-vs-observed-tokens figure."""

from __future__ import annotations

from pathlib import Path

from .dataset import STEPS

PROMPT_BASELINES = ("ssjf-reg", "ssjf-mc", "s3")
COLUMNS = {"long": "Long Seq", "reasoning": "Reasoning", "rl": "RL"}


def cell(result: dict, name: str, t: int = 0) -> str:
    entry = result["predictors"].get(name, {}).get("steps", {}).get(t)
    if entry is None:
        return "–"
    tau = entry["kendall_tau"]
    return f"{entry['mae']:.1f} ± {entry['mae_se']:.1f}" + (f" (τ {tau:+.2f})" if tau is not None else "")


def mae_at(result: dict, name: str, t: int = 0) -> float | None:
    entry = result["predictors"].get(name, {}).get("steps", {}).get(t)
    return None if entry is None else entry["mae"]


def table(results: dict[str, dict]) -> str:
    """Rows: predictors (static at t = 0, progressive at each t); columns: scenarios; cells 'MAE ± standard error
    (Kendall tau)', the MAE of the remaining length after t observed tokens, mean over training seeds."""
    scenarios = list(results)
    names = list(next(iter(results.values()))["predictors"])
    lines = ["| Predictor | " + " | ".join(COLUMNS[s] for s in scenarios) + " |",
             "|---|" + "---|" * len(scenarios)]
    for name in names:
        for t in STEPS:
            if any(t in results[s]["predictors"][name]["steps"] for s in scenarios) and (t == 0 or name in (
                    "plp", "trail", "constant", "egtp-as-remaining")):
                label = name if t == 0 else f"{name}@{t}"
                lines.append(f"| {label} | " + " | ".join(cell(results[s], name, t) for s in scenarios) + " |")
    return "\n".join(lines)


def targets(results: dict[str, dict]) -> dict[str, dict]:
    """The issue's targets, checked on the measured numbers (None where a predictor was not run)."""
    out: dict[str, dict] = {}
    for scenario, result in results.items():
        egtp = mae_at(result, "egtp")
        baselines = [m for m in (mae_at(result, b) for b in PROMPT_BASELINES) if m is not None]
        mean_pool, plp32 = mae_at(result, "pool-mean"), mae_at(result, "plp", 32)
        out[scenario] = {
            "egtp_below_best_prompt_baseline": None if egtp is None or not baselines else egtp < min(baselines),
            "egtp": egtp, "best_prompt_baseline": min(baselines) if baselines else None,
            "egtp_below_mean_pooling": None if egtp is None or mean_pool is None else egtp < mean_pool,
            "mean_pooling": mean_pool,
            "plp32_vs_egtp_pct": None if egtp is None or plp32 is None else 100 * (plp32 / egtp - 1),
        }
    if "rl" in out and out["rl"]["plp32_vs_egtp_pct"] is not None:
        out["rl"]["plp32_at_least_15pct_below_egtp"] = out["rl"]["plp32_vs_egtp_pct"] <= -15
    return out


def plot_curves(results: dict[str, dict], path: Path) -> Path:
    """MAE of the remaining length vs observed tokens t, per scenario, for PLP, TRAIL, the running mean and
    EGTP static read as remaining length (prediction - t); error bars: one standard error over the test items."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), squeeze=False)
    for ax, (scenario, result) in zip(axes[0], results.items()):
        for name, style in (("plp", "o-"), ("trail", "s-"), ("egtp-as-remaining", "^--"), ("constant", "x:")):
            steps = result["predictors"].get(name, {}).get("steps", {})
            if steps:
                ts = sorted(steps)
                ax.errorbar(ts, [steps[t]["mae"] for t in ts], yerr=[steps[t]["mae_se"] for t in ts], fmt=style,
                            capsize=2, label=name)
        ax.set_title(COLUMNS[scenario])
        ax.set_xlabel("observed tokens t")
        ax.set_ylabel("MAE of remaining length (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
