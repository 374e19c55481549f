"""A local report of a finished run: one PNG of panels and one self-contained HTML page, from its wandb offline run.

    rl-lenbalance report outputs/quickstart            # the training output_dir
    rl-lenbalance report outputs/quickstart/wandb/offline-run-20260101_120000-abcd1234 --out /tmp/report
    python -m rl_lenbalance.report outputs/quickstart/wandb/offline-run-.../run-abcd1234.wandb

Everything is read from the ``.wandb`` file (no wandb service, no network) with `rl_lenbalance.wandb_offline`;
a metric the run did not log gives a "no data" panel instead of an error.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import ledger
from .wandb_offline import OfflineRun, find_runs, read_run

PREFIX = "train/lenbalance/"  # transformers' WandbCallback puts the trainer's logs under "train/"
STEP = "train/global_step"
TABLE = f"{PREFIX}lengths"
PNG_NAME, HTML_NAME = "lenbalance_report.png", "lenbalance_report.html"
SUMMARY_NAME = "lenbalance_summary.json"  # written by `rl_lenbalance.train.run` into output_dir

NOW, STOCK, NAIVE = "tab:blue", "tab:gray", "tab:orange"


@dataclass(frozen=True)
class ReportPaths:
    png: Path
    html: Path
    run_dir: Path  # the offline-run-* folder the report was built from


def locate_run(path: str | Path) -> Path:
    """The offline-run folder for a training output_dir, a folder above it, an offline-run folder or its .wandb file.

    If several runs lie below `path`, the most recently modified one is used.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.is_file():
        if path.suffix == ".wandb":
            return path.parent
        raise FileNotFoundError(f"{path} is not a wandb run file (expected run-<id>.wandb).")
    if any(path.glob("*.wandb")):
        return path
    runs = [run for run in find_runs(path) if any(run.glob("*.wandb"))]
    if not runs:
        raise FileNotFoundError(
            f"No wandb offline run found in {path}. Expected a training output_dir containing "
            "wandb/offline-run-*/run-*.wandb (train with report_to: [wandb] and WANDB_MODE=offline), an "
            "offline-run-* folder, or a run-*.wandb file.")
    return runs[-1]


def build_report(run_dir: str | Path, out_dir: str | Path) -> ReportPaths:
    """Read the run found at `run_dir` (see `locate_run`) and write the PNG and HTML report into `out_dir`."""
    folder = locate_run(run_dir)
    run = read_run(folder)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / PNG_NAME
    title = _title(run)
    figure = render_figure(run, load_length_tables(run), title)
    figure.savefig(png, dpi=80)
    rows = totals(run, _find_summary(folder))
    page = out / HTML_NAME
    page.write_text(render_html(title, folder, png.read_bytes(), rows), encoding="utf-8")
    return ReportPaths(png=png, html=page, run_dir=folder)


# --- data -------------------------------------------------------------------------------------------------------


def series(run: OfflineRun, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of a finite numeric key, on the trainer's step axis (wandb's `_step` if it is missing);
    when a step logged the key more than once, the last value wins."""
    by_step: dict[float, float] = {}
    for row in run.history:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            step = row.get(STEP, row["_step"])
            by_step[float(step)] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def load_length_tables(run: OfflineRun) -> dict[int, list[tuple[float, float]]]:
    """(predicted, actual) pairs of every logged predicted-vs-actual table, by training step (last table per step).

    Rows without a finite prediction (rows generated before the first prediction) are dropped.
    """
    files = run.path / "files"
    tables: dict[int, list[tuple[float, float]]] = {}
    for row in run.history:
        ref = row.get(TABLE)
        if not isinstance(ref, dict) or not (files / str(ref.get("path", ""))).is_file():
            continue
        table = json.loads((files / ref["path"]).read_text())
        columns = table.get("columns", [])
        if "predicted_length" not in columns or "actual_length" not in columns:
            continue
        p, a = columns.index("predicted_length"), columns.index("actual_length")
        pairs = [(float(r[p]), float(r[a])) for r in table.get("data", [])
                 if _finite(r[p]) and _finite(r[a])]
        tables[int(row.get(STEP, row["_step"]))] = pairs
    return tables


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def loss_tokens_saved(run: OfflineRun) -> tuple[list[float], list[float]]:
    """Per step, the loss-forward padding tokens stock TRL would compute minus those computed here (`_loss_tokens`)."""
    steps, _, computed, stock = _loss_tokens(run)
    return steps, [b - a for a, b in zip(computed, stock)]


def _loss_tokens(run: OfflineRun) -> tuple[list[float], list[float], list[float], list[float]]:
    """(steps, real, computed, stock-computed) loss-forward tokens per step, estimated from the padding fractions and
    TRL's cumulative `train/num_tokens` (real prompt + completion tokens) x num_iterations."""
    pad_steps, pad = series(run, f"{PREFIX}train/pad_frac")
    stock_by_step = dict(zip(*series(run, f"{PREFIX}train/pad_frac_stock")))
    seen_by_step = dict(zip(*series(run, "train/num_tokens")))
    iterations = run.config.get("num_iterations", 1) or 1
    steps, real, computed, stock, previous = [], [], [], [], 0.0
    for step, frac in zip(pad_steps, pad):
        if step not in seen_by_step or step not in stock_by_step:
            continue
        tokens = (seen_by_step[step] - previous) * iterations
        previous = seen_by_step[step]
        steps.append(step)
        real.append(tokens)
        computed.append(tokens / (1 - frac))
        stock.append(tokens / (1 - stock_by_step[step]))
    return steps, real, computed, stock


def _cumulative(values: list[float]) -> list[float]:
    total, out = 0.0, []
    for value in values:
        total += value
        out.append(total)
    return out


def _find_summary(folder: Path) -> dict[str, Any]:
    """`lenbalance_summary.json` of the output_dir the run was written into (output_dir/wandb/offline-run-*)."""
    for parent in list(folder.parents)[:3]:
        path = parent / SUMMARY_NAME
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError:
                return {}
    return {}


def _title(run: OfflineRun) -> str:
    name = run.config.get("run_name") or run.path.name
    model = run.config.get("_name_or_path") or run.config.get("model_name_or_path")
    steps = series(run, STEP)[1]
    parts = [f"rl-lenbalance report: {name}", f"{int(max(steps)) if steps else 0} steps"]
    if model:
        parts.append(Path(str(model)).name)
    return " | ".join(parts)


# --- figure -----------------------------------------------------------------------------------------------------


def render_figure(run: OfflineRun, tables: dict[int, list[tuple[float, float]]], title: str):
    """A 2 x 4 grid of panels (a matplotlib Figure on the Agg canvas; no pyplot, no global state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(18, 8.5), layout="constrained")
    figure.suptitle(title, fontsize=13)
    axes = figure.subplots(2, 4).ravel()
    _lines(axes[0], run, "(a) loss-forward tokens that are padding", "% of computed tokens",
           [("train/pad_frac", "rl-lenbalance", NOW), ("train/pad_frac_stock", "stock TRL", STOCK)], percent=True)
    _tokens_saved(axes[1], run)
    _lines(axes[2], run, "(b) decode slots wasted on padding", "% of decode slots",
           [("gen/slot_waste", "rl-lenbalance", NOW), ("gen/slot_waste_stock", "stock TRL", STOCK)], percent=True)
    _lines(axes[3], run, "(c) predictor online MAE (before training on the round)", "tokens",
           [("predictor/mae_static", "PLP, prompt only (t=0)", NOW),
            ("predictor/mae_plp32", "PLP after 32 tokens", "tab:green"),
            ("predictor/mae_naive_static", "naive mean (t=0)", NAIVE),
            ("predictor/mae_naive_plp32", "naive mean (t=32)", "tab:red")], dashed={"predictor/mae_naive_static",
                                                                                    "predictor/mae_naive_plp32"})
    _lines(axes[4], run, "(d) rank imbalance: max / mean loss tokens per rank", "max / mean (1 = balanced)",
           [("train/rank_imbalance", "rl-lenbalance", NOW), ("train/rank_imbalance_stock", "stock TRL", STOCK)],
           note=_single_rank_note(run))
    _lines(axes[5], run, "(e) predictor fallbacks and skipped updates (cumulative)", "count",
           [("predictor/fallbacks", "fallbacks to stock scheduling", "tab:red"),
            ("predictor/skipped_updates", "skipped (non-finite) updates", NAIVE)], integer=True)
    _scatter(axes[6], tables)
    _lines(axes[7], run, "predictor overhead (% of generation time)", "%",
           [("predictor/overhead_frac", "hooks + online training", NOW)], percent=True)
    return figure


def _single_rank_note(run: OfflineRun) -> str:
    values = series(run, f"{PREFIX}train/rank_imbalance")[1] + series(run, f"{PREFIX}train/rank_imbalance_stock")[1]
    return "all 1.0: one process (nothing to balance across ranks)" if values and set(values) == {1.0} else ""


def _no_data(ax, title: str, missing: list[str]) -> None:
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, "no data\n" + "\n".join(missing), ha="center", va="center", fontsize=9, color="0.4",
            transform=ax.transAxes, wrap=True)


def _finish(ax, title: str, ylabel: str, integer: bool = False, missing: list[str] = ()) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if integer:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.1, max(1.0, ax.get_ylim()[1]) + 0.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if missing:
        ax.text(0.01, 0.01, "not logged: " + ", ".join(missing), fontsize=7, color="0.4", transform=ax.transAxes)


def _lines(ax, run: OfflineRun, title: str, ylabel: str, keys: list[tuple[str, str, str]], percent: bool = False,
           dashed: set[str] = frozenset(), integer: bool = False, note: str = "") -> None:
    drawn, missing = 0, []
    for key, label, color in keys:
        steps, values = series(run, PREFIX + key)
        if not steps:
            missing.append(label)
            continue
        if percent:
            values = [100 * v for v in values]
        ax.plot(steps, values, marker="o", markersize=4, label=label, color=color,
                linestyle="--" if key in dashed else "-")
        drawn += 1
    if not drawn:
        _no_data(ax, title, [PREFIX + key for key, _, _ in keys])
        return
    if note:
        ax.text(0.5, 0.9, note, ha="center", fontsize=8, color="0.4", transform=ax.transAxes)
    _finish(ax, title, ylabel, integer, missing)


def _tokens_saved(ax, run: OfflineRun) -> None:
    title = "(a) padded tokens saved vs stock TRL (cumulative)"
    loss_steps, loss_saved = loss_tokens_saved(run)
    gen_steps, slots = series(run, f"{PREFIX}gen/decode_slots")
    stock = dict(zip(*series(run, f"{PREFIX}gen/decode_slots_stock")))
    gen = [(s, stock[s] - v) for s, v in zip(gen_steps, slots) if s in stock]
    if not loss_steps and not gen:
        _no_data(ax, title, [f"{PREFIX}train/pad_frac(_stock) + train/num_tokens",
                             f"{PREFIX}gen/decode_slots(_stock)"])
        return
    if loss_steps:
        ax.plot(loss_steps, _cumulative(loss_saved), marker="o", markersize=4, color=NOW,
                label="loss-forward tokens (est.)")
    if gen:
        ax.plot([s for s, _ in gen], _cumulative([v for _, v in gen]), marker="s", markersize=4,
                color="tab:purple", label="decode slots")
    _finish(ax, title, "tokens")


def _scatter(ax, tables: dict[int, list[tuple[float, float]]]) -> None:
    title = "(f) predicted (t=0) vs actual completion length"
    pairs = [(step, p, a) for step, rows in sorted(tables.items()) for p, a in rows]
    if not pairs:
        _no_data(ax, title, [f"{TABLE} (wandb.Table; lenbalance.log_table_every)"])
        return
    last = max(tables)
    earlier = [(p, a) for step, p, a in pairs if step != last]
    recent = [(p, a) for step, p, a in pairs if step == last]
    if earlier:
        ax.scatter([a for _, a in earlier], [p for p, _ in earlier], s=14, alpha=0.35, color=STOCK,
                   label=f"earlier steps ({len(earlier)} rows)")
    if recent:
        mae = sum(abs(p - a) for p, a in recent) / len(recent)
        ax.scatter([a for _, a in recent], [p for p, _ in recent], s=18, alpha=0.8, color=NOW,
                   label=f"step {last} ({len(recent)} rows, MAE {mae:.1f})")
    values = [v for _, p, a in pairs for v in (p, a)]
    lo, hi = min(values), max(values)
    ax.plot([lo, hi], [lo, hi], color="k", linewidth=0.8, linestyle=":", label="predicted = actual")
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel("actual length (tokens)")
    ax.set_ylabel("predicted length (tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


# --- totals and HTML --------------------------------------------------------------------------------------------


def totals(run: OfflineRun, summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, rl-lenbalance, stock TRL) rows of the run's totals: the `rl-lenbalance train` table, from the run's
    `lenbalance_summary.json` when it wrote one, else from its logged metrics (`logged_summary`)."""
    return ledger.summary_rows(summary or logged_summary(run))


def logged_summary(run: OfflineRun) -> dict[str, float]:
    """What `ledger.summary` holds, rebuilt from the logged per-round metrics of a run that wrote no summary (still
    running, or trained without `rl-lenbalance train`). Loss-phase tokens are estimated as in `loss_tokens_saved`."""

    def last(key: str) -> float:
        values = series(run, PREFIX + key)[1]
        return values[-1] if values else math.nan

    def total(key: str) -> float:
        return sum(series(run, PREFIX + key)[1])

    def wasted(real: float, computed: float) -> float:
        return 1.0 - real / computed if computed else math.nan

    steps = series(run, STEP)[1]
    generated = total("gen/real_tokens")
    _, loss_real, computed, stock = _loss_tokens(run)
    return {
        "steps": max(steps) if steps else 0,
        "decode_slot_waste": wasted(generated, total("gen/decode_slots")),
        "decode_slot_waste_stock": wasted(generated, total("gen/decode_slots_stock")),
        "decode_steps": total("gen/decode_steps") or math.nan,
        "decode_steps_stock": total("gen/decode_steps_stock") or math.nan,
        "reprefill_tokens": total("gen/reprefill_tokens"),
        "loss_pad_frac": wasted(sum(loss_real), sum(computed)),
        "loss_pad_frac_stock": wasted(sum(loss_real), sum(stock)),
        "mae_static": last("predictor/mae_static"),
        "mae_plp32": last("predictor/mae_plp32"),
        "mae_naive_static": last("predictor/mae_naive_static"),
        "mae_naive_plp32": last("predictor/mae_naive_plp32"),
        "predictor_overhead_frac": last("predictor/overhead_frac"),
        "fallbacks": last("predictor/fallbacks"),
    }


def render_html(title: str, folder: Path, png: bytes, rows: list[tuple[str, str, str]]) -> str:
    """One self-contained page: the PNG inline as base64 and the totals table; no scripts, no external assets."""
    esc = html.escape
    body = "\n".join(f"<tr><td>{esc(a)}</td><td>{esc(b)}</td><td>{esc(c)}</td></tr>" for a, b, c in rows)
    image = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; }}
td:nth-child(n+2), th:nth-child(n+2) {{ text-align: right; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
code {{ font-size: 90%; }}
</style>
</head>
<body>
<h1>{esc(title)}</h1>
<p>wandb offline run: <code>{esc(str(folder))}</code></p>
<h2>Totals</h2>
<table>
<tr><th>metric</th><th>rl-lenbalance</th><th>stock TRL (same batch)</th></tr>
{body}
</table>
<h2>Per step</h2>
<img alt="rl-lenbalance report panels" src="data:image/png;base64,{image}">
</body>
</html>
"""


def main(argv: list[str] | None = None) -> ReportPaths:
    parser = argparse.ArgumentParser(prog="rl-lenbalance report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="A training output_dir, a wandb offline-run-* folder, or its .wandb file.")
    parser.add_argument("--out", help="Where to write the report (default: RUN_DIR/report, next to a .wandb file).")
    args = parser.parse_args(argv)
    source = Path(args.run_dir)
    out = Path(args.out) if args.out else (source.parent if source.is_file() else source) / "report"
    try:
        paths = build_report(source, out)
    except FileNotFoundError as error:
        parser.exit(2, f"rl-lenbalance report: error: {error}\n")
    print(f"report: {paths.html}\n        {paths.png}\n(from {paths.run_dir})")
    return paths


if __name__ == "__main__":
    main()
