"""The ledger: what rl-lenbalance computed against what stock TRL would have for the same batch.

A rank fills one `GenerationLedger` per rollout round and one `TrainingLedger` per generation batch it trains; the
adapter gathers every rank's, `to_metrics` reduces them to the logged `lenbalance/*` metrics, and `RunTotals` sums
them over the run; `time_metrics` turns the totals' phase seconds into logged metrics. `summary` (over `RunTotals`, or
`logged_totals` rebuilt from logged metrics) and `summary_rows` are the one summary behind the CLI table, the
example, `rl-lenbalance compare` and the report; `summary_json` and `wandb_summary` are its forms for
`lenbalance_summary.json` and the wandb run summary. Framework-free: a `gather` callable stands in for the ranks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, dataclass
from typing import Any

import torch

GENERATION_PLANS = ("stock", "compaction")  # stock's `generate`, or the decode loop that drops finished rows
# runs logged before plans were logged by name hold an index into these orders (`autotune/strategy`, `gen/plan`, ...)
LEGACY_STRATEGIES = ("stock", "stock_trimmed", "sorted", "sorted_uneven", "packed", "shared_prompt")
LEGACY_GENERATION_PLANS = ("stock", "compaction")
Gather = Callable[[torch.Tensor], torch.Tensor]  # (1, n) on this rank -> (ranks, n): every rank's row, rank order


def waste(computed: float, real: float) -> float:
    """What "wasted" means everywhere (`gen/slot_waste`, `train/pad_frac`, the summary's `decode_slot_waste` and
    `loss_pad_frac`, `rl-lenbalance compare`'s `loss_pad_frac`): the fraction of the `computed` tokens (decode slots,
    or loss-forward tokens) that were padding, `1 - real / computed`. NaN when nothing was computed: nothing was
    measured, and the summary leaves such a row out rather than show 0%."""
    return 1.0 - real / computed if computed else math.nan


def finite(value: Any) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def max_over_mean(values: Sequence[float]) -> float:
    """Slowest rank over the mean rank: 1.0 when balanced (or when nothing was computed)."""
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else 1.0


def gather_ledgers(ledger, gather: Gather, device: torch.device | str = "cpu") -> list:
    """Every rank's ledger of `ledger`'s type, in rank order (one collective)."""
    rows = gather(torch.tensor([astuple(ledger)], dtype=torch.float64, device=device)).cpu().tolist()
    return [type(ledger)(*row) for row in rows]


@dataclass
class GenerationLedger:
    """One rank's rollout round."""

    decode_slots: float  # rows in the batch summed over the forwards, each of which yields one token per row
    decode_slots_stock: float  # one generate over all the rank's rows: rows × the longest completion
    decode_steps: float  # forwards of the model
    decode_steps_stock: float  # the longest completion
    real_tokens: float  # completion tokens
    seconds: float  # wall time of the round's generate calls
    hook_seconds: float  # time the capture hooks added
    reprefill_tokens: float  # prompt + prefix tokens prefilled again by re-bucketing
    rows_moved_in: float  # re-bucketed rows this rank continued for another rank


@dataclass
class TrainingLedger:
    """One rank's generation batch, as its loss phase computes it."""

    loss_tokens: float  # tokens of the trimmed micro-batches (prompt + completion columns × rows)
    loss_tokens_stock: float  # stock's micro-batches: every row padded to the batch's widths
    real_tokens: float
    rows_moved_in: float  # rows trained here that another rank generated


def generation_metrics(ranks: Sequence[GenerationLedger]) -> dict[str, float]:
    """The `gen/*` metrics of one round, reduced over ranks (decode steps: the slowest rank's)."""
    real = sum(r.real_tokens for r in ranks)
    slots, stock = sum(r.decode_slots for r in ranks), sum(r.decode_slots_stock for r in ranks)
    return {
        "gen/decode_slots": slots, "gen/decode_slots_stock": stock, "gen/real_tokens": real,
        "gen/slot_waste": waste(slots, real), "gen/slot_waste_stock": waste(stock, real),
        "gen/decode_steps": max(r.decode_steps for r in ranks),
        "gen/decode_steps_stock": max(r.decode_steps_stock for r in ranks),
        "gen/rank_imbalance": max_over_mean([r.decode_slots for r in ranks]),
        "gen/rank_imbalance_stock": max_over_mean([r.decode_slots_stock for r in ranks]),
        "gen/reprefill_tokens": sum(r.reprefill_tokens for r in ranks),
        "gen/rows_moved_across_ranks": sum(r.rows_moved_in for r in ranks),
        "gen/seconds": sum(r.seconds for r in ranks) / len(ranks),
    }


def training_metrics(ranks: Sequence[TrainingLedger]) -> dict[str, float]:
    """The `train/*` metrics of one generation batch, reduced over ranks."""
    computed, stock = [r.loss_tokens for r in ranks], [r.loss_tokens_stock for r in ranks]
    real = sum(r.real_tokens for r in ranks)
    return {
        "train/pad_frac": waste(sum(computed), real), "train/pad_frac_stock": waste(sum(stock), real),
        "train/rank_imbalance": max_over_mean(computed), "train/rank_imbalance_stock": max_over_mean(stock),
        "train/slowest_rank_vs_stock": max(computed) / max(stock) if max(stock) else 1.0,
        "train/rows_moved_across_ranks": sum(r.rows_moved_in for r in ranks),
    }


@dataclass
class RunTotals:
    """Summed over the run (all ranks unless noted): the numbers behind the summary table. Saved with every
    checkpoint, so a resumed run's totals cover the steps before it too."""

    decode_slots: float = 0.0
    decode_slots_stock: float = 0.0
    decode_steps: float = 0.0  # slowest rank's, per round
    decode_steps_stock: float = 0.0
    generated_tokens: float = 0.0
    reprefill_tokens: float = 0.0
    generate_s: float = 0.0  # the generate calls, mean over ranks
    predictor_overhead_s: float = 0.0  # hooks (mean over ranks), online training, prompt-length prefills
    loss_tokens: float = 0.0  # × num_iterations: every pass over a batch computes it again
    loss_tokens_stock: float = 0.0
    loss_real_tokens: float = 0.0
    generation_phase_s: float = 0.0  # this rank: generation, rewards and advantages, as the step sees them
    loss_phase_s: float = 0.0  # this rank: training steps outside generation
    nonfinite_grad_steps: int = 0
    earlier_wall_s: float = 0.0  # wall seconds the run trained before this process, up to the checkpoint it resumed
    uncaptured_rounds: int = 0  # rounds generated without the predictor's hooks: its cost was past max_overhead

    def add_generation(self, ranks: Sequence[GenerationLedger], predictor_train_s: float) -> None:
        """Count one round (every rank's ledger) and the head's online training time."""
        metrics = generation_metrics(ranks)
        self.decode_slots += metrics["gen/decode_slots"]
        self.decode_slots_stock += metrics["gen/decode_slots_stock"]
        self.decode_steps += metrics["gen/decode_steps"]
        self.decode_steps_stock += metrics["gen/decode_steps_stock"]
        self.generated_tokens += metrics["gen/real_tokens"]
        self.reprefill_tokens += metrics["gen/reprefill_tokens"]
        self.generate_s += metrics["gen/seconds"]
        self.predictor_overhead_s += sum(r.hook_seconds for r in ranks) / len(ranks) + predictor_train_s

    def add_training(self, ranks: Sequence[TrainingLedger], passes: int) -> None:
        """Count one generation batch (every rank's ledger), trained `passes` times (TRL's num_iterations)."""
        self.loss_tokens += sum(r.loss_tokens for r in ranks) * passes
        self.loss_tokens_stock += sum(r.loss_tokens_stock for r in ranks) * passes
        self.loss_real_tokens += sum(r.real_tokens for r in ranks) * passes


def round_metrics(ranks: Sequence[GenerationLedger], predictor: Mapping[str, float]) -> dict[str, float]:
    """A round's `gen/*` metrics plus the predictor's share of the generation time."""
    metrics = generation_metrics(ranks)
    hooks = sum(r.hook_seconds for r in ranks)
    seconds = sum(r.seconds for r in ranks)
    overhead = (hooks + predictor.get("predictor/train_s", 0.0) * len(ranks)) / seconds if seconds else 0.0
    return metrics | {"predictor/overhead_frac": overhead}


def seconds_per_decode_step(ranks: Sequence[GenerationLedger]) -> float:
    """A round's time as the generation tuner compares it: the slowest rank's seconds, less the capture hooks'
    (whether a round is captured depends on the predictor's budget, not on the plan, so both plans are compared
    without it), per decode step of stock's `generate` (the longest completion of any rank).

    Per decode step: under greedy decoding (where compaction is exact) both plans decode the same completions, so a
    round takes about (prefill) + (its longest completion) × (one step's cost) either way. Dividing by the longest
    completion cancels what varies from round to round (how long the longest row ran) and keeps what the plan
    changes: the cost of a step (compaction: fewer rows per step, plus its own bookkeeping)."""
    steps = max(r.decode_steps_stock for r in ranks)
    return max(r.seconds - r.hook_seconds for r in ranks) / max(steps, 1.0)


def time_metrics(totals: RunTotals, previous: RunTotals) -> dict[str, float]:
    """The `time/*` metrics (logged as `lenbalance/time/generation_s`, `lenbalance/time/loss_phase_s`): the seconds
    this rank spent in each phase since `previous`, the totals as of the previous log (a `dataclasses.replace` copy;
    `RunTotals()` at the first). With `logging_steps: 1` (every recipe) they are one optimizer step's; summed over a
    run they are its totals."""
    return {"time/generation_s": totals.generation_phase_s - previous.generation_phase_s,
            "time/loss_phase_s": totals.loss_phase_s - previous.loss_phase_s}


LoggedRow = Mapping[str, Any]  # a trainer log row (`trainer.state.log_history`): `step`, TRL's keys, `lenbalance/...`


def _last(logged: Sequence[LoggedRow], key: str) -> Any:
    """The last logged value of `lenbalance/<key>` that is a string or a finite number; None if there is none."""
    for row in reversed(logged):
        value = row.get(f"lenbalance/{key}")
        if isinstance(value, str) or finite(value):
            return value
    return None


def logged_loss_tokens(logged: Sequence[LoggedRow], passes: int = 1) -> list[tuple[float, float, float, float]]:
    """(step, real, computed, stock-computed) loss-forward tokens of each logged step, estimated from its padding
    fractions and TRL's cumulative `num_tokens` (real prompt + completion tokens) × `passes` (num_iterations)."""
    out: list[tuple[float, float, float, float]] = []
    seen = 0.0
    for row in logged:
        tokens = row.get("num_tokens")
        pad, stock = row.get("lenbalance/train/pad_frac"), row.get("lenbalance/train/pad_frac_stock")
        if not finite(tokens):
            continue
        real, seen = (tokens - seen) * passes, tokens
        if finite(pad) and finite(stock):
            out.append((row["step"], real, real / (1 - pad), real / (1 - stock)))
    return out


def logged_totals(logged: Sequence[LoggedRow], passes: int = 1) -> RunTotals:
    """`RunTotals` rebuilt from a run's logged metrics, for a run that wrote no summary (still running, or trained
    without `rl-lenbalance train`): per-round counts summed over the logged steps (exact with one round per log; TRL
    averages several), loss-forward tokens estimated as in `logged_loss_tokens`. A total never logged is NaN."""

    def total(key: str) -> float:
        values = [row[f"lenbalance/{key}"] for row in logged if finite(row.get(f"lenbalance/{key}"))]
        return sum(values) if values else math.nan

    overhead = [row["lenbalance/predictor/overhead_frac"] * row["lenbalance/gen/seconds"] for row in logged
                if finite(row.get("lenbalance/predictor/overhead_frac")) and finite(row.get("lenbalance/gen/seconds"))]
    loss = logged_loss_tokens(logged, passes)

    def loss_total(column: int) -> float:  # 1: real, 2: computed, 3: stock-computed
        return sum(step[column] for step in loss) if loss else math.nan

    return RunTotals(
        decode_slots=total("gen/decode_slots"), decode_slots_stock=total("gen/decode_slots_stock"),
        decode_steps=total("gen/decode_steps"), decode_steps_stock=total("gen/decode_steps_stock"),
        generated_tokens=total("gen/real_tokens"), reprefill_tokens=total("gen/reprefill_tokens"),
        generate_s=total("gen/seconds"), predictor_overhead_s=sum(overhead) if overhead else math.nan,
        loss_tokens=loss_total(2), loss_tokens_stock=loss_total(3), loss_real_tokens=loss_total(1),
        generation_phase_s=total("time/generation_s"), loss_phase_s=total("time/loss_phase_s"),
        nonfinite_grad_steps=int(_last(logged, "train/nonfinite_grad_steps") or 0),
    )


def named(key: str, names: Sequence[str], chosen: str) -> dict[str, float]:
    """One 0/1 metric per name, `key/<name>`, 1 for `chosen`: no registry order in the logs, and a mean over a log
    interval is each name's share of it."""
    return {f"{key}/{name}": float(name == chosen) for name in names}


def logged_name(row: Mapping[str, Any], key: str, legacy: Sequence[str] = ()) -> str | None:
    """The name a log row holds under `lenbalance/<key>` (`named`'s one metric at 1); in a run logged before names,
    a name or an index into `legacy` at `lenbalance/<key>` itself. None when the row names none, or a mean of
    several."""
    prefix = f"lenbalance/{key}/"
    ones = [name[len(prefix):] for name, value in row.items() if name.startswith(prefix) and value == 1]
    if ones:
        return ones[0] if len(ones) == 1 else None
    old = row.get(f"lenbalance/{key}")
    if isinstance(old, str):
        return old
    if finite(old) and float(old).is_integer() and 0 <= old < len(legacy):
        return legacy[int(old)]
    return None


def _last_name(logged: Sequence[LoggedRow], key: str, legacy: Sequence[str]) -> str | None:
    return next((name for row in reversed(logged) if (name := logged_name(row, key, legacy)) is not None), None)


def _plan_state(logged: Sequence[LoggedRow]) -> dict[str, Any]:
    """The summary's training-plan entries: the plan each logged step ran (`plan_by_step`), and the tuner's state,
    "chosen" (`autotune_choice`, `autotune_ratio_vs_stock`) or "measuring" (`autotune_pass` of
    `autotune_passes_to_measure`); empty when no plan was logged."""
    by_step = {f"{int(row['step'])}": name for row in logged
               if "step" in row and (name := logged_name(row, "autotune/strategy", LEGACY_STRATEGIES)) is not None}
    out: dict[str, Any] = {"plan_by_step": by_step} if by_step else {}
    choice = _last_name(logged, "autotune/choice", LEGACY_STRATEGIES)
    if choice is not None:
        ratio = _last(logged, "autotune/ratio_vs_stock")
        return out | {"autotune_state": "chosen", "autotune_choice": choice,
                      "autotune_ratio_vs_stock": math.nan if ratio is None else ratio}
    passes, needed = _last(logged, "autotune/pass"), _last(logged, "autotune/passes_to_measure")
    if passes is None or needed is None:
        return out
    return out | {"autotune_state": "measuring", "autotune_pass": int(passes),
                  "autotune_passes_to_measure": int(needed)}


def _generation_plan_state(logged: Sequence[LoggedRow]) -> dict[str, Any]:
    """The summary's generation-plan entries: the tuner's choice (`generation_plan`, a name of `GENERATION_PLANS`)
    and stock's time over it (`generation_plan_ratio_vs_stock`, NaN until both were measured), or
    `generation_plan: "measuring"` before the first choice; empty when no round logged a plan."""
    choice = _last_name(logged, "gen/choice", LEGACY_GENERATION_PLANS)
    if choice is not None:
        ratio = _last(logged, "gen/ratio_vs_stock")
        return {"generation_plan": choice, "generation_plan_ratio_vs_stock": math.nan if ratio is None else ratio}
    return {"generation_plan": "measuring"} if _last_name(logged, "gen/plan", LEGACY_GENERATION_PLANS) else {}


def _predictor_state(logged: Sequence[LoggedRow]) -> dict[str, Any]:
    """The summary's predictor entries, all from the last round that scored the head: its MAE and the naive
    estimate's (NaN where not logged), that round's number among the captured ones and its step, how many rounds were
    captured, and why capture stopped when rounds ran without it (`predictor/uncaptured_rounds`)."""
    keys = ("mae_static", "mae_plp32", "mae_naive_static", "mae_naive_plp32")
    scored = [row for row in logged if any(finite(row.get(f"lenbalance/predictor/{key}")) for key in keys[:2])]
    row = scored[-1] if scored else {}
    out = {key: row[f"lenbalance/predictor/{key}"] if finite(row.get(f"lenbalance/predictor/{key}")) else math.nan
           for key in keys}
    captured, uncaptured = _last(logged, "predictor/captured_rounds"), _last(logged, "predictor/uncaptured_rounds")
    round_ = row.get("lenbalance/predictor/captured_rounds")
    out |= {"predictor_round": int(round_) if finite(round_) else None,
            "predictor_step": row["step"] if finite(row.get("step")) else None,
            "captured_rounds": math.nan if captured is None else int(captured)}
    if captured is not None and uncaptured:
        out["capture_stopped"] = (
            f"after round {int(captured)}, the predictor's cost passed lenbalance.max_overhead of generation time and "
            "nothing on this path reads the predictions (no generation waves or re-bucketing), so "
            f"{int(uncaptured)} round{'s' if uncaptured != 1 else ''} ran without capture and the head learned from "
            f"{int(captured)} round{'s' if captured != 1 else ''} only (lenbalance.max_overhead: 1.0 captures every "
            "round)")
    return out


def summary(totals: RunTotals, logged: Sequence[LoggedRow], steps: int, wall_s: float = math.nan,
            fallbacks: int | None = None) -> dict[str, Any]:
    """The run's summary (`lenbalance_summary.json`), the one behind every table: seconds per phase, padding against
    stock TRL (`waste`), the training and generation plans (`_plan_state`, `_generation_plan_state`) and the
    predictor (`_predictor_state`). `totals` are the run's (`RunTotals`, or `logged_totals(logged)`); `logged` are
    the trainer's log rows, read for what only they hold: the predictor's values, `fallbacks` unless given, and the
    plans (`logged_name`: by name, or by index in a run logged before names). Anything else not
    measured is NaN (`summary_json` writes it as null)."""

    def last(key: str) -> float:
        value = _last(logged, key)
        return math.nan if value is None else value

    return {
        "steps": steps,
        "wall_s": wall_s + totals.earlier_wall_s,  # a resumed run's: its earlier processes' too, like every total
        "generation_s": totals.generate_s,
        "generation_phase_s": totals.generation_phase_s,
        "loss_phase_s": totals.loss_phase_s,
        "decode_slot_waste": waste(totals.decode_slots, totals.generated_tokens),
        "decode_slot_waste_stock": waste(totals.decode_slots_stock, totals.generated_tokens),
        "decode_slots": totals.decode_slots,
        "decode_slots_stock": totals.decode_slots_stock,
        "decode_steps": totals.decode_steps,
        "decode_steps_stock": totals.decode_steps_stock,
        "reprefill_tokens": totals.reprefill_tokens,
        "loss_pad_frac": waste(totals.loss_tokens, totals.loss_real_tokens),
        "loss_pad_frac_stock": waste(totals.loss_tokens_stock, totals.loss_real_tokens),
        "loss_tokens_saved": totals.loss_tokens_stock - totals.loss_tokens,
        "predictor_overhead_frac": totals.predictor_overhead_s / totals.generate_s if totals.generate_s else math.nan,
        "fallbacks": last("predictor/fallbacks") if fallbacks is None else fallbacks,
        "skipped_updates": last("predictor/skipped_updates"),
        "nonfinite_grad_steps": totals.nonfinite_grad_steps,
    } | _predictor_state(logged) | _plan_state(logged) | _generation_plan_state(logged)


def training_plan(summary: Mapping[str, Any]) -> str | None:
    """The tuner's state in a summary: "<choice> (<ratio>× stock)" once chosen (a plain name for a summary that has
    only its choice), "measuring: pass n of m, no choice yet" before; None when the run logged no plan."""
    choice = summary.get("autotune_choice")
    if choice is not None:
        ratio = summary.get("autotune_ratio_vs_stock")
        return choice + (f" ({ratio:.2f}× stock)" if finite(ratio) else "")
    if summary.get("autotune_state") == "measuring":
        return (f"measuring: pass {summary['autotune_pass']} of {summary['autotune_passes_to_measure']}, "
                "no choice yet")
    return None


def generation_plan(summary: Mapping[str, Any]) -> str | None:
    """The generation tuner's state in a summary: "<choice> (<ratio>× stock)" once chosen, "measuring, no choice
    yet" before; None when the run logged no generation plan."""
    choice = summary.get("generation_plan")
    if choice is None:
        return None
    if choice == "measuring":
        return "measuring, no choice yet"
    ratio = summary.get("generation_plan_ratio_vs_stock")
    return choice + (f" ({ratio:.2f}× stock)" if finite(ratio) else "")


def plans_by_step(summary: Mapping[str, Any], most: int = 8) -> str | None:
    """The plan each step ran, as "1 sorted, 2 stock, 3-5 sorted" (runs of a plan joined), or each plan's count of
    steps when that takes more than `most` runs; None when the summary has none."""
    by_step = summary.get("plan_by_step") or {}
    if not by_step:
        return None
    runs: list[list] = []  # [first step, last step, plan]
    for step, name in by_step.items():
        if runs and runs[-1][2] == name:
            runs[-1][1] = step
        else:
            runs.append([step, step, name])
    if len(runs) <= most:
        return ", ".join(f"{a}{'' if a == b else f'-{b}'} {name}" for a, b, name in runs)
    counts: dict[str, int] = {}
    for name in by_step.values():
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name}: {n} steps" for name, n in sorted(counts.items(), key=lambda item: -item[1]))


def predictor_label(summary: Mapping[str, Any]) -> str:
    """Where a summary's predictor figures come from: "round r of n captured (step s)", "before online training" in
    round 1 (the MAE is scored before the head trains on its round); empty when unknown."""
    round_, captured, step = (summary.get(k) for k in ("predictor_round", "captured_rounds", "predictor_step"))
    if not finite(round_):
        return ""
    details = [f"step {step:g}"] if finite(step) else []
    details += ["before online training"] if round_ == 1 else []
    return (f"round {round_:.0f}" + (f" of {captured:.0f} captured" if finite(captured) else "")
            + (f" ({', '.join(details)})" if details else ""))


def summary_json(summary: Mapping[str, Any]) -> str:
    """A summary as strict JSON (`lenbalance_summary.json`): NaN and infinities, which JSON lacks, become null."""

    def strict(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, Mapping):
            return {key: strict(v) for key, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(v) for v in value]
        return value

    return json.dumps(strict(summary), indent=2, allow_nan=False)


def wandb_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A summary's entries for the wandb run summary (`run.summary.update`), under `lenbalance/`: its finite numbers,
    strings and the plan of each step; what was not measured is left out."""
    return {f"lenbalance/{key}": value for key, value in summary.items()
            if finite(value) or isinstance(value, (str, Mapping))}


SECONDS_NOTE = ("Seconds: measured on this rank, per optimizer step, with the run's total in brackets; stock TRL's "
                "on the same hardware: `rl-lenbalance compare`.")


def summary_rows(summary: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, rl-lenbalance, stock TRL on the same batches) rows of a summary, each phase's measured seconds above
    its padding; entries it lacks (NaN or absent, e.g. a report built from a partial run's logged metrics) are left
    out. Seconds are per optimizer step, with the run's total in brackets, and have no stock column (put
    `SECONDS_NOTE` under the table)."""
    pct = "{:.1%}".format
    steps = summary.get("steps") or 0

    def has(*keys: str) -> bool:
        return all(finite(summary.get(k)) for k in keys)

    def seconds(total: float) -> str:
        return f"{total / steps:.2f} s/step ({total:.1f} s)" if steps else f"{total:.1f} s"

    rows = [("steps", f"{steps:.0f}", "")]
    if has("wall_s"):
        rows.append(("whole step (wall time / steps)", seconds(summary["wall_s"]), ""))
    if has("generation_phase_s"):
        rows.append(("generation phase (rollouts, rewards), this rank", seconds(summary["generation_phase_s"]), ""))
    if has("decode_slot_waste", "decode_slot_waste_stock"):
        rows.append(("decode slots wasted on padding", pct(summary["decode_slot_waste"]),
                     pct(summary["decode_slot_waste_stock"])))
    if has("decode_steps", "decode_steps_stock"):
        rows.append(("decode steps, slowest rank (summed over rounds)", f"{summary['decode_steps']:.0f}",
                     f"{summary['decode_steps_stock']:.0f}"))
    if has("reprefill_tokens") and summary["reprefill_tokens"]:
        rows.append(("tokens re-prefilled by re-bucketing", f"{summary['reprefill_tokens']:.0f}", "0"))
    if (plan := generation_plan(summary)) is not None:
        rows.append(("generation plan", plan, ""))
    if has("loss_phase_s"):
        rows.append(("loss phase (forward, backward), this rank", seconds(summary["loss_phase_s"]), ""))
    if (plan := training_plan(summary)) is not None:
        rows.append(("training plan", plan, ""))
    if (by_step := plans_by_step(summary)) is not None:
        rows.append(("plan of each step", by_step, ""))
    if has("loss_pad_frac", "loss_pad_frac_stock"):
        rows.append(("loss-forward tokens that are padding", pct(summary["loss_pad_frac"]),
                     pct(summary["loss_pad_frac_stock"])))
    where = predictor_label(summary) or "last round"
    for label, key in (("predictor MAE at t=0", "static"), ("predictor MAE at t=32", "plp32")):
        if has(f"mae_{key}"):
            naive = f"naive {summary[f'mae_naive_{key}']:.1f} tok" if has(f"mae_naive_{key}") else "naive: not logged"
            rows.append((f"{label}, {where}", f"{summary[f'mae_{key}']:.1f} tok", naive))
    if has("captured_rounds"):
        rows.append(("rounds the predictor captured", f"{summary['captured_rounds']:.0f} in {steps:.0f} steps", ""))
    if summary.get("capture_stopped"):
        rows.append(("why capture stopped", summary["capture_stopped"], ""))
    if has("predictor_overhead_frac"):
        rows.append(("predictor overhead, whole run (% of generation time)",
                     pct(summary["predictor_overhead_frac"]), ""))
    if has("fallbacks"):
        rows.append(("predictor fallbacks", f"{summary['fallbacks']:.0f}", ""))
    return rows
