"""The training-side plan of one generation batch: which optimizer step each row trains in (stock's shuffle decides),
and, inside each optimizer step, which rank trains it in which micro-batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .plan import plan_microbatches


def optimizer_steps(shuffle: Sequence[int], steps_per_generation: int, gradient_accumulation_steps: int) -> list[int]:
    """The optimizer step (0 .. steps_per_generation / gradient_accumulation_steps - 1) each row trains in.

    Stock TRL permutes a rank's rows with `shuffle`, cuts them into `steps_per_generation` equal micro-batches, and
    accumulates `gradient_accumulation_steps` of them per optimizer step; regrouping rows inside their optimizer
    step leaves every update unchanged.
    """
    rows = len(shuffle)
    if steps_per_generation % gradient_accumulation_steps or rows % steps_per_generation:
        raise ValueError(f"{rows} rows, steps_per_generation={steps_per_generation} and gradient_accumulation_steps="
                         f"{gradient_accumulation_steps} do not cut into whole optimizer steps")
    per_step = rows // steps_per_generation * gradient_accumulation_steps
    step = [0] * rows
    for position, row in enumerate(shuffle):
        step[row] = position // per_step
    return step


@dataclass
class TrainingPlan:
    """One rank's share of a generation batch whose rows are numbered rank-major (rank r's rows come r-th)."""

    rows: list[int]  # the rows this rank trains, in micro-batch order
    offset: int  # this rank's first row: `rows[i] - offset` indexes its own block when nothing is exchanged
    sizes: list[int]  # rows per micro-batch
    moved_in: int  # rows this rank trains that another rank generated
    exchange: bool  # some rank trains a row another rank generated: the batch must be gathered


def plan_training(
    completion_lengths: Sequence[int],
    prompt_lengths: Sequence[int],
    steps: Sequence[int],
    num_ranks: int,
    rank: int,
    microbatches_per_step: int,
    attention_alpha: float = 0.0,
    method: str = "best",
    uneven: bool = False,
) -> TrainingPlan:
    """Plan every optimizer step of a batch of `num_ranks` equal blocks of rows (`steps`: each row's optimizer step,
    from `optimizer_steps`) with `plan_microbatches`; return `rank`'s share. Every rank computes the same plan."""
    per_rank = len(completion_lengths) // num_ranks
    mine: list[int] = []
    sizes: list[int] = []
    exchange = False
    for step in range(max(steps, default=-1) + 1):
        rows = [i for i, s in enumerate(steps) if s == step]  # rank-major, as gathered
        plan = plan_microbatches([completion_lengths[i] for i in rows], num_ranks, microbatches_per_step,
                                 attention_alpha, method, [prompt_lengths[i] for i in rows], uneven)
        plan = [[[rows[i] for i in part] for part in parts] for parts in plan]
        exchange |= any(row // per_rank != r for r, parts in enumerate(plan) for part in parts for row in part)
        mine += [row for part in plan[rank] for row in part]
        sizes += [len(part) for part in plan[rank]]
    return TrainingPlan(mine, rank * per_rank, sizes, sum(row // per_rank != rank for row in mine), exchange)
