"""Training-side plan: which rows each data-parallel rank trains, in which micro-batch."""

from __future__ import annotations

from collections.abc import Sequence

from .partition import PARTITIONERS


def padded_cost(lengths: Sequence[float], rows: Sequence[int], attention_alpha: float = 0.0) -> float:
    """Cost of running `rows` as one padded micro-batch: rows × (W + α·W²), W the longest row."""
    width = max(lengths[i] for i in rows)
    return len(rows) * (width + attention_alpha * width * width)


def plan_microbatches(
    lengths: Sequence[float],
    num_ranks: int,
    microbatches_per_rank: int,
    attention_alpha: float = 0.0,
    method: str = "best",
) -> list[list[list[int]]]:
    """Rows of the whole generation batch → for each rank, its micro-batches (lists of row indices).

    Rows are sorted by length and cut into equal micro-batches of neighbours (least padding); the micro-batches
    are then dealt to ranks, an equal count each, so that the ranks' padded costs are balanced. Every micro-batch
    has the same number of rows, which keeps TRL's per-micro-batch loss normalisation unchanged.
    """
    count = num_ranks * microbatches_per_rank
    if len(lengths) % count:
        raise ValueError(
            f"{len(lengths)} rows cannot be cut into {num_ranks} ranks × {microbatches_per_rank} equal micro-batches."
        )
    size = len(lengths) // count
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = [order[k * size : (k + 1) * size] for k in range(count)]
    if num_ranks == 1:
        return [batches]
    costs = [padded_cost(lengths, rows, attention_alpha) for rows in batches]
    return [[batches[b] for b in part] for part in PARTITIONERS[method](costs, num_ranks, equal_size=True)]
