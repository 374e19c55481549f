"""Loss-phase strategies: the exact ways of cutting each optimizer step's rows into micro-batches.

Every strategy trains each row in the optimizer step stock TRL's shuffle gives it, so the update is stock's wherever
the strategy is exact. Strategies that regroup rows (move a row into another micro-batch than stock's) are exact only
when nothing TRL computes per micro-batch depends on which rows share it; `regrouping_blockers` lists what does.
A new strategy is one entry of `STRATEGIES` (and, if it needs a new plan, one branch of the adapter's planner).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .exchange import TrainingPlan

ROW_MEAN_LOSSES = ("grpo", "dr_grpo", "sapo", "luspo")  # a micro-batch's loss is a mean over its rows
GLOBAL_LOSSES = ("dapo", "cispo", "vespo")  # normalised by the whole generation batch's tokens (`num_items_in_batch`)


@dataclass(frozen=True)
class Strategy:
    """How one optimizer step's rows become micro-batches."""

    name: str
    regroups: bool  # rows leave stock's micro-batches (length-sorted, maybe across ranks)
    uneven: bool  # micro-batches may hold different numbers of rows (row-mean losses are reweighted)
    trims: bool  # columns that are padding in every row of a micro-batch are cut
    help: str
    packs: bool = False  # the loss forward runs each micro-batch's rows as one padding-free sequence


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("stock", False, False, False, "TRL's own shuffle and equal split, every row padded to the batch's width"),
    Strategy("stock_trimmed", False, False, True,
             "stock's rows in each micro-batch, with the all-padding columns cut (exact under every TRL setting)"),
    Strategy("sorted", True, False, True,
             "length-sorted micro-batches of stock's row count, dealt to ranks by padded cost, padding trimmed"),
    Strategy("sorted_uneven", True, True, True,
             "length-sorted micro-batches of any row count (long rows in small ones), none wider than stock's"),
    Strategy("packed", True, True, True,
             "sorted_uneven's micro-batches, each run as one padding-free sequence (`rl_lenbalance.packing`): logits "
             "only at real completion tokens", packs=True),
)}


def regrouping_blockers(loss_type: str | None, entropy_coef: float = 0.0, use_adaptive_entropy: bool = False,
                        top_entropy_quantile: float = 1.0, router_aux_loss: bool = False) -> list[str]:
    """The trainer settings under which regrouping rows would change what is learned (empty: every strategy is
    exact). `loss_type` None is RLOO's loss, a mean over sequences."""
    blockers = []
    if loss_type is not None and loss_type not in ROW_MEAN_LOSSES + GLOBAL_LOSSES:
        blockers.append(f"loss_type={loss_type!r} (normalised by each micro-batch's own tokens)")
    if entropy_coef:
        blockers.append(f"entropy_coef={entropy_coef} (a per-micro-batch entropy mean)")
    if use_adaptive_entropy:
        blockers.append("use_adaptive_entropy=True (a per-micro-batch entropy mean)")
    if top_entropy_quantile < 1.0:
        blockers.append(f"top_entropy_quantile={top_entropy_quantile} (a per-micro-batch entropy quantile)")
    if router_aux_loss:
        blockers.append("router_aux_loss_coef != 0 (a per-micro-batch MoE load-balancing loss)")
    return blockers


def exact_strategies(blockers: Sequence[str]) -> list[str]:
    """The strategies that give stock's update under settings with these `regrouping_blockers`, stock first."""
    return [name for name, s in STRATEGIES.items() if not (s.regroups and blockers)]


def stock_plan(shuffle: Sequence[int], steps_per_generation: int) -> TrainingPlan:
    """Stock TRL's micro-batches of one rank: its rows permuted by `shuffle`, cut into `steps_per_generation` equal
    parts (row indices are the rank's own: nothing moves between ranks)."""
    size = len(shuffle) // steps_per_generation
    return TrainingPlan(list(shuffle), 0, [size] * steps_per_generation, 0, False)
