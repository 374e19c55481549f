"""Admission for backends that schedule requests themselves (transformers continuous batching, vLLM): which rank
generates which row, and in which order its rows are submitted."""

from __future__ import annotations

from collections.abc import Sequence

from .partition import PARTITIONERS
from .rebucket import closest_ranks


def admission_order(predicted: Sequence[float], group_size: int = 1) -> list[int]:
    """Rows in the order to submit them: blocks of `group_size` consecutive rows (whole GRPO groups, for a backend
    that generates a group from one request; 1: any row alone), the longest predicted block (by its mean) first,
    ties in their order. A backend admitting requests first come, first served then starts its longest work first
    (longest-processing-time first), which shortens the makespan when requests outnumber its slots."""
    if group_size < 1 or len(predicted) % group_size:
        raise ValueError(f"{len(predicted)} rows do not form whole blocks of group_size={group_size}")
    blocks = range(len(predicted) // group_size)
    mean = [sum(predicted[b * group_size : (b + 1) * group_size]) / group_size for b in blocks]
    return [b * group_size + j for b in sorted(blocks, key=lambda b: (-mean[b], b)) for j in range(group_size)]


def balance_rows(predicted: Sequence[float], num_ranks: int, group_size: int = 1,
                 method: str = "best") -> list[list[int]]:
    """Every rank's rows (rank-major, as gathered: an equal count each) → the rows each rank generates, an equal
    count each, balanced by predicted decode work (the sum of predicted lengths: a continuous-batching backend
    refills a finished row's slot at once). Blocks of `group_size` consecutive rows (whole GRPO groups) move
    together. Each part goes to the rank that holds most of its rows; when moving would not shorten the slowest
    rank, every rank keeps its own rows (nothing to send)."""
    if num_ranks < 1 or len(predicted) % (num_ranks * group_size):
        raise ValueError(f"{len(predicted)} rows are not an equal share of whole blocks of {group_size} for each of "
                         f"{num_ranks} ranks")
    per_rank = len(predicted) // num_ranks
    origin = [row // per_rank for row in range(len(predicted))]
    blocks = len(predicted) // group_size
    cost = [sum(predicted[b * group_size : (b + 1) * group_size]) for b in range(blocks)]
    parts = PARTITIONERS[method]([float(c) for c in cost], num_ranks, equal_size=True)
    parts = [[b * group_size + j for b in part for j in range(group_size)] for part in parts]
    moved = [waves[0] if waves else [] for waves in closest_ranks([[part] for part in parts], origin)]
    in_place = [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(num_ranks)]

    def slowest(plan: list[list[int]]) -> float:
        return max(sum(predicted[i] for i in rows) for rows in plan)

    return moved if slowest(moved) < slowest(in_place) else in_place
