"""Balanced partitions of items into parts (ranks) by cost: Karmarkar-Karp, LPT, and the better of the two."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence

Partitioner = Callable[[Sequence[float], int, bool], list[list[int]]]
_Part = tuple[float, list[int]]  # (load, item indices)


def _check_parts(num_items: int, num_parts: int, equal_size: bool) -> None:
    if num_parts < 1:
        raise ValueError(f"num_parts must be at least 1, got {num_parts}")
    if equal_size and num_items % num_parts:
        raise ValueError(f"cannot split {num_items} items into {num_parts} parts of equal size: "
                         f"{num_items} is not divisible by {num_parts}")


def _canonical(parts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Sort indices inside each part, and order parts by their smallest index (empty parts last)."""
    return sorted((sorted(p) for p in parts), key=lambda p: (not p, p))


def karmarkar_karp(costs: Sequence[float], num_parts: int, equal_size: bool = True) -> list[list[int]]:
    """Partition item indices into `num_parts` parts of near-equal total cost by the largest differencing method.

    Each partial solution holds `num_parts` parts sorted by load; the two solutions with the largest spread
    (heaviest minus lightest part) are merged by joining the heaviest part of one with the lightest of the
    other, until one solution is left. With `equal_size` every part gets exactly `len(costs) // num_parts` items.
    """
    _check_parts(len(costs), num_parts, equal_size)
    order = sorted(range(len(costs)), key=lambda i: (costs[i], i))
    if equal_size:
        seeds = [[[i] for i in order[s:s + num_parts]] for s in range(0, len(order), num_parts)]
    else:
        seeds = [[[i]] + [[] for _ in range(num_parts - 1)] for i in order]
    ties = itertools.count()
    heap = [_kk_entry([(sum(costs[i] for i in p), p) for p in parts], next(ties)) for parts in seeds]
    heapq.heapify(heap)
    while len(heap) > 1:
        a, b = heapq.heappop(heap)[-1], heapq.heappop(heap)[-1]
        merged = [(la + lb, pa + pb) for (la, pa), (lb, pb) in zip(a, reversed(b))]
        heapq.heappush(heap, _kk_entry(merged, next(ties)))
    return _canonical([p for _, p in heap[0][-1]] if heap else [[] for _ in range(num_parts)])


def _kk_entry(parts: list[_Part], tie: int) -> tuple[float, float, int, list[_Part]]:
    """Heap entry of a partial solution: largest spread first, then heaviest part first, then oldest first."""
    parts = sorted(parts, key=lambda part: -part[0])
    return (parts[-1][0] - parts[0][0], -parts[0][0], tie, parts)


def lpt_partition(costs: Sequence[float], num_parts: int, equal_size: bool = True) -> list[list[int]]:
    """Partition by longest-processing-time greedy: heaviest item first, each to the lightest part with room."""
    _check_parts(len(costs), num_parts, equal_size)
    capacity = len(costs) // num_parts if equal_size else len(costs)
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    heap = [(0.0, p) for p in range(num_parts)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, p = heapq.heappop(heap)
        parts[p].append(i)
        if len(parts[p]) < capacity:
            heapq.heappush(heap, (load + costs[i], p))
    return _canonical(parts)


def best_partition(costs: Sequence[float], num_parts: int, equal_size: bool = True) -> list[list[int]]:
    """The better balanced of Karmarkar–Karp and LPT (KK wins with many items per part, LPT with few)."""
    candidates = [karmarkar_karp(costs, num_parts, equal_size), lpt_partition(costs, num_parts, equal_size)]
    return min(candidates, key=lambda parts: imbalance(costs, parts) if parts and costs else 0.0)


PARTITIONERS: dict[str, Partitioner] = {"kk": karmarkar_karp, "lpt": lpt_partition, "best": best_partition}


def imbalance(costs: Sequence[float], parts: Sequence[Sequence[int]]) -> float:
    """Heaviest part's cost over the mean part cost: 1.0 when perfectly balanced (or when all costs are zero)."""
    if not parts:
        raise ValueError("imbalance needs at least one part")
    loads = [sum(costs[i] for i in p) for p in parts]
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean else 1.0
