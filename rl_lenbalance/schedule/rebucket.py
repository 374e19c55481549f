"""Early re-bucketing: after a short probe, regroup the still-running rows of every rank by their new predicted
remaining length into waves, and deal the waves to ranks so that the slowest rank has the least left to decode."""

from __future__ import annotations

from collections.abc import Sequence

from scipy.optimize import linear_sum_assignment

from .partition import PARTITIONERS
from .waves import waves_by_length

RankWaves = list[list[list[int]]]  # rank -> wave -> row indices


def wave_cost(remaining: Sequence[float], rows: Sequence[int], compacted: bool) -> float:
    """Decode slots a wave spends: Σ remaining when finished rows leave the batch, else rows × the longest."""
    if not rows:
        return 0.0
    return float(sum(remaining[i] for i in rows)) if compacted else len(rows) * max(remaining[i] for i in rows)


def rebucket(
    remaining: Sequence[float],
    origin: Sequence[int],
    num_ranks: int,
    wave_size: int,
    compacted: bool,
    method: str = "best",
) -> RankWaves:
    """Running rows (of all ranks) → for each rank, its waves of at most `wave_size` rows, longest first.

    `remaining` is each row's predicted remaining length and `origin` the rank that probed it. Two plans are
    scored: every rank keeps its own rows, or rows move between ranks. Without compaction the global longest-first
    order is cut into waves that are dealt whole to ranks; with it rows are partitioned one by one (a finished row
    costs nothing, so only the sum per rank matters). The plan whose slowest rank costs least wins, ties to the
    lowest total, then to keeping rows where they are (nothing to send).
    """
    if wave_size < 1:
        raise ValueError(f"wave_size must be at least 1, got {wave_size}")
    if len(remaining) != len(origin) or any(not 0 <= r < num_ranks for r in origin):
        raise ValueError(f"origin must give a rank in [0, {num_ranks}) for each of the {len(remaining)} rows")

    def waves_of(rows: list[int]) -> list[list[int]]:
        return [[rows[i] for i in wave] for wave in waves_by_length([remaining[i] for i in rows], wave_size)]

    in_place = [waves_of([i for i in range(len(remaining)) if origin[i] == r]) for r in range(num_ranks)]
    if compacted:
        parts = PARTITIONERS[method]([float(x) for x in remaining], num_ranks, equal_size=False)
        moved = [waves_of(part) for part in parts]
    else:
        waves = waves_of(list(range(len(remaining))))
        parts = PARTITIONERS[method]([wave_cost(remaining, w, False) for w in waves], num_ranks, equal_size=False)
        moved = [[waves[w] for w in part] for part in parts]
    moved = closest_ranks(moved, origin)

    def score(plan: RankWaves) -> tuple[float, float]:
        per_rank = [sum(wave_cost(remaining, wave, compacted) for wave in rank) for rank in plan]
        return max(per_rank, default=0.0), sum(per_rank)

    return min([in_place, moved], key=score)


def closest_ranks(parts: RankWaves, origin: Sequence[int]) -> RankWaves:
    """Hand the parts (one per rank) to ranks so that the most rows stay where they were probed (an optimal
    assignment)."""
    held = [[sum(origin[i] == rank for wave in part for i in wave) for rank in range(len(parts))] for part in parts]
    part_of, rank_of = linear_sum_assignment(held, maximize=True)
    out: RankWaves = [[] for _ in parts]
    for part, rank in zip(part_of, rank_of, strict=True):
        out[rank] = parts[part]
    return out
