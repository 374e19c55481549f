"""The ledger: what rl-lenbalance computed against what stock TRL would have for the same batch.

A rank fills one `GenerationLedger` per rollout round and one `TrainingLedger` per generation batch it trains; the
adapter gathers every rank's, `to_metrics` reduces them to the logged `lenbalance/*` metrics, and `RunTotals` sums
them over the run. `summary` and `summary_rows` are the one summary behind the CLI table, the wandb report, the
examples and the benchmarks. Framework-free: a `gather` callable stands in for the ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, dataclass

import torch

Gather = Callable[[torch.Tensor], torch.Tensor]  # (1, n) on this rank -> (ranks, n): every rank's row, rank order


def waste(computed: float, real: float) -> float:
    """Fraction of computed tokens that were padding."""
    return 1.0 - real / computed if computed else 0.0


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
    """Summed over the run (all ranks unless noted): the numbers behind the summary table."""

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


def summary(totals: RunTotals, logged: Sequence[Mapping[str, float]], steps: int, wall_s: float,
            fallbacks: int) -> dict[str, float]:
    """The run's summary (`lenbalance_summary.json`): time, padding against stock, predictor error (its last
    logged values; `logged` are the trainer's log rows, `lenbalance/`-prefixed keys)."""

    def last(key: str) -> float:
        values = [row[f"lenbalance/{key}"] for row in logged if f"lenbalance/{key}" in row]
        return values[-1] if values else math.nan

    def wasted(real: float, computed: float) -> float:
        return 1.0 - real / computed if computed else math.nan

    return {
        "steps": steps,
        "wall_s": wall_s,
        "generation_s": totals.generate_s,
        "generation_phase_s": totals.generation_phase_s,
        "loss_phase_s": totals.loss_phase_s,
        "mae_static": last("predictor/mae_static"),
        "mae_plp32": last("predictor/mae_plp32"),
        "mae_naive_static": last("predictor/mae_naive_static"),
        "mae_naive_plp32": last("predictor/mae_naive_plp32"),
        "decode_slot_waste": wasted(totals.generated_tokens, totals.decode_slots),
        "decode_slot_waste_stock": wasted(totals.generated_tokens, totals.decode_slots_stock),
        "decode_slots": totals.decode_slots,
        "decode_slots_stock": totals.decode_slots_stock,
        "decode_steps": totals.decode_steps,
        "decode_steps_stock": totals.decode_steps_stock,
        "reprefill_tokens": totals.reprefill_tokens,
        "loss_pad_frac": wasted(totals.loss_real_tokens, totals.loss_tokens),
        "loss_pad_frac_stock": wasted(totals.loss_real_tokens, totals.loss_tokens_stock),
        "loss_tokens_saved": totals.loss_tokens_stock - totals.loss_tokens,
        "predictor_overhead_frac": totals.predictor_overhead_s / totals.generate_s if totals.generate_s else math.nan,
        "fallbacks": fallbacks,
        "skipped_updates": last("predictor/skipped_updates"),
        "nonfinite_grad_steps": totals.nonfinite_grad_steps,
    }


def summary_rows(summary: Mapping[str, float]) -> list[tuple[str, str, str]]:
    """(metric, rl-lenbalance, stock TRL on the same batches) rows of a summary; entries it lacks (NaN or absent,
    e.g. a report built from a partial run's logged metrics) are left out."""
    pct = "{:.1%}".format

    def has(*keys: str) -> bool:
        return all(isinstance(summary.get(k), (int, float)) and math.isfinite(summary[k]) for k in keys)

    compare = "`rl-lenbalance compare`"
    rows = [("steps" + (" / wall time" if has("wall_s") else ""),
             f"{summary.get('steps', 0):.0f}" + (f" / {summary['wall_s']:.0f} s" if has("wall_s") else ""), "")]
    if has("generation_phase_s", "loss_phase_s"):
        rows += [("seconds generating (rollouts, rewards), this rank", f"{summary['generation_phase_s']:.1f} s",
                  compare),
                 ("seconds in the loss phase (forward, backward), this rank", f"{summary['loss_phase_s']:.1f} s",
                  compare)]
    if has("decode_slot_waste", "decode_slot_waste_stock"):
        rows.append(("decode slots wasted on padding", pct(summary["decode_slot_waste"]),
                     pct(summary["decode_slot_waste_stock"])))
    if has("decode_steps", "decode_steps_stock"):
        rows.append(("decode steps, slowest rank (summed over rounds)", f"{summary['decode_steps']:.0f}",
                     f"{summary['decode_steps_stock']:.0f}"))
    if has("reprefill_tokens") and summary["reprefill_tokens"]:
        rows.append(("tokens re-prefilled by re-bucketing", f"{summary['reprefill_tokens']:.0f}", "0"))
    if has("loss_pad_frac", "loss_pad_frac_stock"):
        rows.append(("loss-forward tokens that are padding", pct(summary["loss_pad_frac"]),
                     pct(summary["loss_pad_frac_stock"])))
    for label, key in (("predictor MAE, prompt only (t=0), last round", "static"),
                       ("predictor MAE, PLP after 32 tokens, last round", "plp32")):
        if has(f"mae_{key}"):
            naive = f"naive {summary[f'mae_naive_{key}']:.1f} tok" if has(f"mae_naive_{key}") else ""
            rows.append((label, f"{summary[f'mae_{key}']:.1f} tok", naive))
    if has("predictor_overhead_frac"):
        rows.append(("predictor overhead (% of generation time)", pct(summary["predictor_overhead_frac"]), ""))
    if has("fallbacks"):
        rows.append(("predictor fallbacks", f"{summary['fallbacks']:.0f}", ""))
    return rows
