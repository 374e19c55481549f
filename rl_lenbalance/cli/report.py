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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import ledger
from ..predictor.context import CANDIDATES
from .wandb_offline import OfflineRun, find_runs, read_run

WANDB_PREFIX = "train/"  # transformers' WandbCallback puts the trainer's logs under "train/"
LB = "lenbalance/"  # rl-lenbalance's keys in the trainer's logs (in wandb: train/lenbalance/...)
STEP = "train/global_step"
TABLE = f"{WANDB_PREFIX}{LB}lengths"
PNG_NAME, HTML_NAME = "lenbalance_report.png", "lenbalance_report.html"
SUMMARY_NAME = "lenbalance_summary.json"  # written by `rl_lenbalance.train.run` into output_dir

DPI = 150
NOW, STOCK, NAIVE, WHOLE = "tab:blue", "tab:gray", "tab:orange", "black"
EXPLORING = "tab:olive"  # shading of the steps whose loss plan the tuner was measuring


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
    summary = _find_summary(folder) or logged_summary(run)
    title = _title(run, summary)
    figure = render_figure(run, load_length_tables(run), title)
    figure.savefig(png, dpi=DPI)
    page = out / HTML_NAME
    page.write_text(render_html(title, folder, png.read_bytes(), ledger.summary_rows(summary)), encoding="utf-8")
    return ReportPaths(png=png, html=page, run_dir=folder)


# --- data -------------------------------------------------------------------------------------------------------


def logged_rows(run: OfflineRun) -> list[dict[str, Any]]:
    """The run's history as the trainer's log rows (`trainer.state.log_history`'s form, which `ledger` reads): one row
    per training step, in step order, under `step` (`train/global_step`; wandb's `_step` if it is missing), keys
    without WandbCallback's `train/`; when a step logged a key more than once, its last value wins."""
    by_step: dict[float, dict[str, Any]] = {}
    for row in run.history:
        step = float(row.get(STEP, row["_step"]))
        merged = by_step.setdefault(step, {"step": step})
        merged.update({key.removeprefix(WANDB_PREFIX): value for key, value in row.items()
                       if not key.startswith("_") and key != STEP and value is not None and value == value})  # not NaN
    return [by_step[step] for step in sorted(by_step)]


def series(run: OfflineRun, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of a finite numeric key of the trainer's logs (`lenbalance/gen/slot_waste`, `num_tokens`),
    on the trainer's step axis (see `logged_rows`)."""
    points = [(row["step"], float(row[key])) for row in logged_rows(run) if ledger.finite(row.get(key))]
    return [step for step, _ in points], [value for _, value in points]


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
                 if ledger.finite(r[p]) and ledger.finite(r[a])]
        tables[int(row.get(STEP, row["_step"]))] = pairs
    return tables


def loss_tokens_saved(run: OfflineRun) -> tuple[list[float], list[float]]:
    """Per step, the loss-forward padding tokens stock TRL would compute minus those computed here (estimated:
    `ledger.logged_loss_tokens`)."""
    estimated = ledger.logged_loss_tokens(logged_rows(run), _iterations(run))
    return [step for step, *_ in estimated], [stock - computed for _, _, computed, stock in estimated]


def _iterations(run: OfflineRun) -> int:
    return run.config.get("num_iterations", 1) or 1


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


def _title(run: OfflineRun, summary: dict[str, Any]) -> str:
    name = run.config.get("run_name") or run.path.name
    model = run.config.get("_name_or_path") or run.config.get("model_name_or_path")
    parts = [f"rl-lenbalance report: {name}", f"{summary.get('steps', 0):.0f} steps"]
    if model:
        parts.append(Path(str(model)).name)
    if (plan := ledger.training_plan(summary)) is not None:
        parts.append(f"training plan: {plan}")
    return " | ".join(parts)


# --- figure -----------------------------------------------------------------------------------------------------


def render_figure(run: OfflineRun, tables: dict[int, list[tuple[float, float]]], title: str):
    """A 3 x 3 grid of panels, time and padding first (a matplotlib Figure on the Agg canvas; no pyplot, no global
    state). Keys are the trainer's (`lenbalance/...`; in wandb under `train/`)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(16, 12.5), layout="constrained")
    figure.suptitle(title, fontsize=13)
    axes = figure.subplots(3, 3).ravel()
    exploring = _exploring_steps(run)
    _lines(axes[0], run, "(a) seconds per optimizer step, this rank", "seconds",
           [(f"{LB}time/generation_s", "generation phase", "tab:purple"), (f"{LB}time/loss_phase_s", "loss phase", NOW),
            ("step_time", "this run's whole step: TRL's step_time (no device sync)", WHOLE)], dashed={"step_time"},
           totals={f"{LB}time/generation_s", f"{LB}time/loss_phase_s"},
           note="stock TRL's seconds: rl-lenbalance compare")
    _lines(axes[1], run, "(b) loss-forward tokens that are padding", "% of computed tokens",
           [(f"{LB}train/pad_frac", "rl-lenbalance", NOW), (f"{LB}train/pad_frac_stock", "stock TRL", STOCK)],
           percent=True, exploring=exploring, plans=_plans_by_step(run))
    _lines(axes[2], run, "(c) decode slots wasted on padding", "% of decode slots",
           [(f"{LB}gen/slot_waste", "rl-lenbalance", NOW), (f"{LB}gen/slot_waste_stock", "stock TRL", STOCK)],
           percent=True)
    _tokens_saved(axes[3], run, exploring)
    _lines(axes[4], run, "(e) rank imbalance: max / mean loss tokens per rank", "max / mean (1 = balanced)",
           [(f"{LB}train/rank_imbalance", "rl-lenbalance", NOW),
            (f"{LB}train/rank_imbalance_stock", "stock TRL", STOCK)],
           note=_single_rank_note(run))
    _overhead(axes[5], run)
    captured = _captured_note(run)
    probe = _live_probe(run)  # the live keys name the re-bucketing probe's step: plp<step>
    head = [(f"{LB}predictor/live_mae_static", "PLP (live), t=0", NOW)]
    estimates = [(f"{LB}predictor/live_mae_naive_static", "naive (live), t=0", NAIVE)]
    if probe:
        head.append((f"{LB}predictor/live_mae_{probe}", f"PLP (live), t={probe[3:]}, the probe", "tab:green"))
        estimates += [(f"{LB}predictor/live_mae_naive_{probe}", f"naive (live), t={probe[3:]}", "tab:red"),
                      (f"{LB}predictor/live_mae_median_{probe}", f"running median (live), t={probe[3:]}", "tab:brown")]
    replay = [(f"{LB}predictor/mae_static", "PLP (replay), t=0", "0.55"),
              (f"{LB}predictor/mae_plp32", "PLP (replay), t=32", "0.3")]
    _lines(axes[6], run, "(g) predictor MAE per captured round (scored before training on it)", "tokens",
           head + estimates + replay, dashed={key for key, _, _ in estimates},
           markers={key: "x" for key, _, _ in replay},
           note="\n".join(note for note in (captured, _kendall_note(run, probe), _used_note(run, probe)) if note))
    _scatter(axes[7], tables, _captured_rounds(run), captured)
    _lines(axes[8], run, "(i) predictor fallbacks and skipped updates (cumulative)", "count",
           [(f"{LB}predictor/fallbacks", "fallbacks to stock scheduling", "tab:red"),
            (f"{LB}predictor/skipped_updates", "skipped (non-finite) updates", NAIVE)], integer=True,
           markers={f"{LB}predictor/fallbacks": "o", f"{LB}predictor/skipped_updates": "x"})
    return figure


def _exploring_steps(run: OfflineRun) -> list[float]:
    """The steps whose loss pass measured a plan before the tuner chose one (`autotune/exploring`)."""
    steps, values = series(run, f"{LB}autotune/exploring")
    return [step for step, value in zip(steps, values) if value]


def _plans_by_step(run: OfflineRun) -> dict[float, str]:
    """The loss plan each step ran, by name (`autotune/strategy/<name>`, or an index in a run logged before names)."""
    return {row["step"]: name for row in logged_rows(run)
            if (name := ledger.logged_name(row, "autotune/strategy", ledger.LEGACY_STRATEGIES)) is not None}


def _captured_rounds(run: OfflineRun) -> dict[float, int]:
    """The rounds the predictor had captured by each step (`predictor/captured_rounds`)."""
    return {step: int(value) for step, value in zip(*series(run, f"{LB}predictor/captured_rounds"))}


def _captured_note(run: OfflineRun) -> str:
    rounds = _captured_rounds(run)
    if not rounds:
        return ""
    uncaptured = series(run, f"{LB}predictor/uncaptured_rounds")[1]
    skipped = f", {uncaptured[-1]:.0f} not (max_overhead)" if uncaptured and uncaptured[-1] else ""
    captured = max(rounds.values())
    return f"{captured} round{'s' if captured != 1 else ''} captured{skipped}" + (
        "\n(round 1: before online training)" if max(rounds.values()) == 1 else "")


def _mark_exploration(ax, steps: list[float]) -> None:
    """Shade the steps the tuner spent measuring plans (one legend entry)."""
    for i, step in enumerate(steps):
        ax.axvspan(step - 0.5, step + 0.5, color=EXPLORING, alpha=0.15, linewidth=0,
                   label="tuner measuring plans" if i == 0 else None)


def _live_probe(run: OfflineRun) -> str:
    """The label (`plp<step>`) of the live predictions at the re-bucketing probe, "" when none were logged."""
    found = {match.group(1) for row in logged_rows(run) for key in row
             if (match := re.fullmatch(rf"{LB}predictor/live_mae_(plp\d+)", key))}
    return min(found, default="")


def _kendall_note(run: OfflineRun, probe: str) -> str:
    """The mean Kendall tau at the probe: of the live predictions, or else of the replay's at t=32."""
    live = [(f"live_kendall_{probe}", f"live, t={probe[3:]}")] if probe else []
    for key, what in [*live, ("kendall_plp32", "replay, t=32")]:
        values = [v for v in series(run, f"{LB}predictor/{key}")[1] if math.isfinite(v)]
        if values:
            return f"Kendall tau ({what}), predicted vs actual\nremaining: {sum(values) / len(values):.2f} (mean)"
    return ""


def _used_note(run: OfflineRun, probe: str) -> str:
    """Which prediction the scheduler acted on in the last round that logged it (`predictor/used_*`)."""
    used = []
    for label, step in (("static", "0"), (probe, probe[3:])):
        values = series(run, f"{LB}predictor/used_{label}")[1] if label else []
        if values:
            used.append(f"{CANDIDATES[int(values[-1])]} at t={step}")
    return "last round acted on: " + ", ".join(used) if used else ""


def _single_rank_note(run: OfflineRun) -> str:
    values = series(run, f"{LB}train/rank_imbalance")[1] + series(run, f"{LB}train/rank_imbalance_stock")[1]
    return "all 1.0: one process (nothing to balance across ranks)" if values and set(values) == {1.0} else ""


def _no_data(ax, title: str, missing: list[str]) -> None:
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, "no data\n" + "\n".join(missing), ha="center", va="center", fontsize=9, color="0.4",
            transform=ax.transAxes, wrap=True)


def _finish(ax, title: str, ylabel: str, integer: bool = False, missing: list[str] = (), note: str = "") -> None:
    """Title, axes on whole training steps (a step or two get a margin, never fractional ticks), and the legend
    with `note` as its title (inside the panel, placed clear of the data)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    lo, hi = ax.dataLim.intervalx
    if math.isfinite(lo) and hi - lo < 2:
        ax.set_xlim(math.floor(lo) - 1, math.ceil(hi) + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if integer:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.1, max(1.0, ax.get_ylim()[1]) + 0.1)
    ax.grid(alpha=0.3)
    _legend(ax, note)
    if missing:
        ax.text(0.01, 0.01, "not logged: " + ", ".join(missing), fontsize=7, color="0.4", transform=ax.transAxes)


def _legend(ax, note: str = "") -> None:
    """A legend whose entries all show at full opacity, `note` as its title."""
    legend = ax.legend(fontsize=8, title=note or None, title_fontsize=7, framealpha=0.9)
    legend.get_title().set_color("0.35")
    for handle in legend.legend_handles:
        handle.set_alpha(1.0)


def _lines(ax, run: OfflineRun, title: str, ylabel: str, keys: list[tuple[str, str, str]], percent: bool = False,
           dashed: set[str] = frozenset(), integer: bool = False, note: str = "",
           totals: set[str] = frozenset(), exploring: list[float] = (), plans: dict[float, str] | None = None,
           markers: dict[str, str] | None = None) -> None:
    """One line per (key, label, color); the labels of `totals` keys end with their sum over the run (seconds).
    `exploring` steps are shaded; `plans` (a short run's plan of each step) label the step ticks; `markers`
    gives keys another marker than "o" (a hollow "o" when given), so that equal values stay visible."""
    drawn, missing = 0, []
    for key, label, color in keys:
        steps, values = series(run, key)
        if not steps:
            missing.append(label)
            continue
        if key in totals:
            label += f" ({sum(values):.1f} s in all)"
        if percent:
            values = [100 * v for v in values]
        marker = (markers or {}).get(key, "o")
        hollow = markers is not None and marker == "o"
        ax.plot(steps, values, marker=marker, markersize=8 if hollow else 5, label=label, color=color,
                markerfacecolor="none" if hollow else color, linestyle="--" if key in dashed else "-")
        drawn += 1
    if not drawn:
        _no_data(ax, title, [WANDB_PREFIX + key for key, _, _ in keys])
        return
    _mark_exploration(ax, exploring)
    _finish(ax, title, ylabel, integer, missing, note)
    if plans and len(plans) <= 12:  # a short run: each step's tick names its plan
        ax.set_xticks(list(plans), [f"{step:g}\n{name}" for step, name in plans.items()], fontsize=8)
        ax.set_xlabel("training step and its loss plan")


def _tokens_saved(ax, run: OfflineRun, exploring: list[float] = ()) -> None:
    title = "(d) padded tokens saved vs stock TRL (cumulative)"
    loss_steps, loss_saved = loss_tokens_saved(run)
    gen_steps, slots = series(run, f"{LB}gen/decode_slots")
    stock = dict(zip(*series(run, f"{LB}gen/decode_slots_stock")))
    gen = [(s, stock[s] - v) for s, v in zip(gen_steps, slots) if s in stock]
    if not loss_steps and not gen:
        _no_data(ax, title, [f"{WANDB_PREFIX}{LB}train/pad_frac(_stock) + {WANDB_PREFIX}num_tokens",
                             f"{WANDB_PREFIX}{LB}gen/decode_slots(_stock)"])
        return
    if loss_steps:
        ax.plot(loss_steps, _cumulative(loss_saved), marker="o", markersize=4, color=NOW,
                label="loss-forward tokens (est.)")
    if gen:
        ax.plot([s for s, _ in gen], _cumulative([v for _, v in gen]), marker="s", markersize=4,
                color="tab:purple", label="decode slots")
    _mark_exploration(ax, exploring)
    _finish(ax, title, "tokens")


def _overhead(ax, run: OfflineRun) -> None:
    """(f): the run's predictor cost so far over its generation time (what `lenbalance.max_overhead` bounds), each
    captured round's own share, and the rounds that ran without capture shaded as such (not drawn as a zero cost)."""
    title = "(f) predictor overhead (% of generation time)"
    run_steps, shares = series(run, f"{LB}predictor/overhead_frac_run")
    steps, rounds = series(run, f"{LB}predictor/overhead_frac")
    captured = _captured_rounds(run)
    if not run_steps and not steps:
        _no_data(ax, title, [f"{WANDB_PREFIX}{LB}predictor/overhead_frac(_run)"])
        return
    if run_steps:
        ax.plot(run_steps, [100 * v for v in shares], marker="o", markersize=5, color=NOW,
                label="whole run so far (bounded by lenbalance.max_overhead)")
    previous, uncaptured = 0, []
    for step in sorted(captured):
        uncaptured += [step] if captured[step] == previous else []
        previous = captured[step]
    own = [(step, 100 * value) for step, value in zip(steps, rounds) if step not in uncaptured]
    if own:
        ax.plot([s for s, _ in own], [v for _, v in own], marker="s", markersize=5, linestyle="none",
                color="tab:purple", label="captured round: hooks + online training")
    for i, step in enumerate(uncaptured):
        ax.axvspan(step - 0.5, step + 0.5, color="0.6", alpha=0.2, linewidth=0,
                   label="round not captured (no hooks)" if i == 0 else None)
    _finish(ax, title, "%")


def _scatter(ax, tables: dict[int, list[tuple[float, float]]], captured: dict[float, int] | None = None,
             note: str = "") -> None:
    """(h): the last logged round's predictions at t=0 against the actual lengths, earlier logged rounds behind;
    the title names the round (`captured`: the rounds captured by each step) and the step."""
    title = "(h) predicted (t=0) vs actual completion length"
    pairs = [(step, p, a) for step, rows in sorted(tables.items()) for p, a in rows]
    if not pairs:
        _no_data(ax, title, [f"{TABLE} (wandb.Table; lenbalance.log_table_every)"])
        return
    last = max(tables)
    round_ = (captured or {}).get(float(last))
    name = f"round {round_} (step {last})" if round_ is not None else f"step {last}"
    earlier = [(p, a) for step, p, a in pairs if step != last]
    recent = [(p, a) for step, p, a in pairs if step == last]
    if earlier:
        ax.scatter([a for _, a in earlier], [p for p, _ in earlier], s=14, alpha=0.35, color=STOCK,
                   label=f"earlier logged rounds ({len(earlier)} rows)")
    if recent:
        mae = sum(abs(p - a) for p, a in recent) / len(recent)
        ax.scatter([a for _, a in recent], [p for p, _ in recent], s=18, alpha=0.8, color=NOW,
                   label=f"{name}: {len(recent)} rows, MAE {mae:.1f}")
    values = [v for _, p, a in pairs for v in (p, a)]
    lo, hi = min(values), max(values)
    ax.plot([lo, hi], [lo, hi], color="k", linewidth=0.8, linestyle=":", label="predicted = actual")
    ax.set_title(f"{title}\n{name}", fontsize=10, loc="left")
    ax.set_xlabel("actual length (tokens)")
    ax.set_ylabel("predicted length (tokens)")
    ax.grid(alpha=0.3)
    _legend(ax, note)


# --- totals and HTML --------------------------------------------------------------------------------------------


def logged_summary(run: OfflineRun) -> dict[str, Any]:
    """`ledger.summary` of a run that wrote no `lenbalance_summary.json` (still running, or trained without
    `rl-lenbalance train`), from its logged metrics (`ledger.logged_totals`); its wall time is TRL's `train_runtime`,
    known once training ended."""
    rows = logged_rows(run)
    return ledger.summary(ledger.logged_totals(rows, _iterations(run)), rows,
                          steps=int(max((row["step"] for row in rows), default=0)),
                          wall_s=run.summary.get("train_runtime", math.nan))


def render_html(title: str, folder: Path, png: bytes, rows: list[tuple[str, str, str]]) -> str:
    """One self-contained page: the totals table and the PNG inline as base64; no scripts, no external assets.
    Readable on a phone: a viewport tag, the table scrolls sideways inside its box, the image fits the width."""
    esc = html.escape

    def cell(text: str) -> str:  # numbers align right, sentences (a plan per step, why capture stopped) left
        return f'<td class="text">{esc(text)}</td>' if len(text) > 30 else f"<td>{esc(text)}</td>"

    body = "\n".join(f"<tr><td>{esc(a)}</td>{cell(b)}{cell(c)}</tr>" for a, b, c in rows)
    image = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1em auto; padding: 0 1em; max-width: 1200px; color: #222;
       line-height: 1.4; }}
h1 {{ font-size: 1.3em; overflow-wrap: anywhere; }}
.table {{ overflow-x: auto; max-width: 100%; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; vertical-align: top; }}
td:first-child {{ min-width: 12em; }}
td:nth-child(2) {{ max-width: 40em; }}
td:nth-child(n+2), th:nth-child(n+2) {{ text-align: right; }}
td.text {{ text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; height: auto; }}
code {{ font-size: 90%; overflow-wrap: anywhere; }}
@media (max-width: 600px) {{ body {{ padding: 0 0.5em; font-size: 15px; }} th, td {{ padding: 3px 6px; }} }}
</style>
</head>
<body>
<h1>{esc(title)}</h1>
<p>wandb offline run: <code>{esc(str(folder))}</code></p>
<h2>Totals</h2>
<div class="table">
<table>
<tr><th>metric</th><th>rl-lenbalance</th><th>stock TRL (same batch)</th></tr>
{body}
</table>
</div>
<p>{esc(ledger.SECONDS_NOTE)}</p>
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
    blocker = next((path for path in (out, *out.parents) if path.exists()), None)
    if blocker is not None and not blocker.is_dir():
        parser.exit(2, f"rl-lenbalance report: error: --out {str(out)!r}: {str(blocker)!r} is a file, and the report "
                       f"is a folder ({HTML_NAME} and {PNG_NAME}); pass a folder (new or existing) with --out.\n")
    try:
        paths = build_report(source, out)
    except FileNotFoundError as error:
        parser.exit(2, f"rl-lenbalance report: error: {error}\n")
    print(f"report: {paths.html}\n        {paths.png}\n(from {paths.run_dir})")
    return paths


if __name__ == "__main__":
    main()
