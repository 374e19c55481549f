"""The pure schedulers: rank partitions (KK, LPT), generation waves, padding and re-bucketing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rl_lenbalance import schedule
from rl_lenbalance.schedule import (
    imbalance,
    karmarkar_karp,
    lpt_partition,
    padded_tokens,
    waves_by_length,
)

PARTITIONS = [karmarkar_karp, lpt_partition]
EXAMPLES = settings(max_examples=100, deadline=None)
costs_st = st.integers(min_value=0, max_value=5000)


@st.composite
def equal_problem(draw):
    """Costs whose count divides evenly into the drawn number of parts."""
    num_parts = draw(st.integers(1, 6))
    per_part = draw(st.integers(0, 8))
    costs = draw(st.lists(costs_st, min_size=num_parts * per_part, max_size=num_parts * per_part))
    return costs, num_parts


def loads(costs, parts):
    return [sum(costs[i] for i in p) for p in parts]


def assert_exact_cover(parts, n):
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))  # nothing lost, nothing duplicated


def assert_canonical(parts):
    assert all(p == sorted(p) for p in parts)
    assert parts == sorted(parts, key=lambda p: (not p, p))


# --- costs and imbalance ------------------------------------------------------------------------------------------


def test_imbalance_is_max_over_mean():
    costs = [4, 1, 1, 2]
    assert imbalance(costs, [[0], [1, 2, 3]]) == pytest.approx(4 / 4)
    assert imbalance(costs, [[0, 3], [1, 2]]) == pytest.approx(6 / 4)
    assert imbalance(costs, [[0, 1, 2, 3], []]) == pytest.approx(8 / 4)
    assert imbalance([0, 0, 0, 0], [[0, 1], [2, 3]]) == 1.0
    with pytest.raises(ValueError, match="at least one part"):
        imbalance(costs, [])


# --- rank partitions ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("partition", PARTITIONS)
@EXAMPLES
@given(problem=equal_problem())
def test_equal_size_partition_covers_balances_and_is_canonical(partition, problem):
    costs, num_parts = problem
    parts = partition(costs, num_parts)
    assert len(parts) == num_parts
    assert_exact_cover(parts, len(costs))
    assert all(len(p) == len(costs) // num_parts for p in parts)
    assert_canonical(parts)
    if costs:
        assert max(loads(costs, parts)) <= sum(costs) / num_parts + max(costs)
    assert partition(costs, num_parts) == parts  # deterministic


@pytest.mark.parametrize("partition", PARTITIONS)
@EXAMPLES
@given(costs=st.lists(costs_st, max_size=30), num_parts=st.integers(1, 6))
def test_free_size_partition_covers_and_bounds_the_heaviest_part(partition, costs, num_parts):
    parts = partition(costs, num_parts, equal_size=False)
    assert len(parts) == num_parts
    assert_exact_cover(parts, len(costs))
    assert_canonical(parts)
    if costs:
        assert max(loads(costs, parts)) <= sum(costs) / num_parts + max(costs)


@pytest.mark.parametrize("partition", PARTITIONS)
def test_partition_rejects_uneven_split_and_no_parts(partition):
    with pytest.raises(ValueError, match="7 items into 3 parts.*7 is not divisible by 3"):
        partition([1] * 7, 3)
    with pytest.raises(ValueError, match="num_parts must be at least 1, got 0"):
        partition([1] * 4, 0)
    assert partition([1] * 7, 3, equal_size=False)  # free sizes accept any count


def test_karmarkar_karp_beats_round_robin_on_alternating_lengths():
    costs = [100, 1] * 4
    round_robin = [[i for i in range(len(costs)) if i % 2 == r] for r in range(2)]
    assert imbalance(costs, round_robin) == pytest.approx(400 / 202)
    parts = karmarkar_karp(costs, 2)
    assert loads(costs, parts) == [202, 202]
    assert imbalance(costs, parts) == 1.0


@pytest.mark.parametrize(("costs", "num_parts", "equal_size"), [
    ([8, 7, 6, 5, 4], 2, False),  # LPT: 17 vs 13; KK: 16 vs 14
    ([20000 // (i + 1) for i in range(64)], 4, False),
    ([50 + 7 * i for i in range(60)] + [4000, 3500, 3000, 2000], 4, False),
    ([(i * i) % 997 + 10 for i in range(64)], 4, True),
    ([(i * i) % 997 + 10 for i in range(64)], 4, False),
])
def test_karmarkar_karp_strictly_beats_lpt_on_fixed_examples(costs, num_parts, equal_size):
    kk = imbalance(costs, karmarkar_karp(costs, num_parts, equal_size))
    lpt = imbalance(costs, lpt_partition(costs, num_parts, equal_size))
    assert kk < lpt


def test_lpt_gives_each_item_to_the_lightest_part_with_room():
    # 10 -> A, 1 -> B, 1 -> B (B lighter), B is full, so the last 1 must go to A.
    assert lpt_partition([10, 1, 1, 1], 2) == [[0, 3], [1, 2]]
    assert lpt_partition([10, 1, 1, 1], 2, equal_size=False) == [[0], [1, 2, 3]]


def test_empty_input_gives_empty_parts():
    for partition in PARTITIONS:
        assert partition([], 3) == [[], [], []]
        assert partition([], 3, equal_size=False) == [[], [], []]


# --- waves and chunks ---------------------------------------------------------------------------------------------

lengths_st = st.lists(st.integers(0, 50), max_size=40)


@EXAMPLES
@given(lengths=lengths_st, wave_size=st.integers(1, 10))
def test_waves_run_longest_first_in_full_waves(lengths, wave_size):
    waves = waves_by_length(lengths, wave_size)
    assert_exact_cover(waves, len(lengths))
    assert all(len(w) == wave_size for w in waves[:-1])
    assert all(1 <= len(w) <= wave_size for w in waves)
    for wave, after in zip(waves, waves[1:]):
        assert min(lengths[i] for i in wave) >= max(lengths[i] for i in after)
    flat = [i for w in waves for i in w]
    assert flat == sorted(flat, key=lambda i: (-lengths[i], i))  # stable: ties keep index order


def test_waves_fixed_example_and_error():
    assert waves_by_length([3, 9, 3, 7, 1], 2) == [[1, 3], [0, 2], [4]]
    assert waves_by_length([], 4) == []
    with pytest.raises(ValueError, match="wave_size must be at least 1, got 0"):
        waves_by_length([1, 2], 0)


def test_sorting_reduces_padding_versus_interleaved_chunks():
    lengths = [100, 1, 100, 1, 100, 1, 100, 1]
    interleaved = [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert padded_tokens(lengths, interleaved) == 800
    assert padded_tokens(lengths, waves_by_length(lengths, 4)) == 404 == sum(lengths)


def test_padded_tokens():
    lengths = [5, 3, 8, 1]
    assert padded_tokens(lengths, [[0, 1], [2, 3], []]) == 2 * 5 + 2 * 8
    assert padded_tokens(lengths, [[0, 1, 2, 3]]) == 32
    assert padded_tokens([], []) == 0


@EXAMPLES
@given(
    st.lists(st.tuples(st.integers(0, 500), st.integers(0, 3)), max_size=40),
    st.integers(1, 4), st.integers(1, 9), st.booleans(),
)
def test_rebucket_keeps_every_row_once_in_ordered_waves_and_bounds_the_slowest_rank(rows, num_ranks, wave_size,
                                                                                     compacted):
    remaining = [float(r) for r, _ in rows]
    origin = [o % num_ranks for _, o in rows]
    plan = schedule.rebucket(remaining, origin, num_ranks, wave_size, compacted)
    assert len(plan) == num_ranks
    placed = sorted(i for rank in plan for wave in rank for i in wave)
    assert placed == list(range(len(rows)))
    for rank in plan:
        assert all(0 < len(wave) <= wave_size for wave in rank)
        longest = [max(remaining[i] for i in wave) for wave in rank]
        assert all(remaining[a] >= remaining[b] for wave in rank for a, b in zip(wave, wave[1:]))
        assert longest == sorted(longest, reverse=True)  # longest wave first, as waves_by_length does

    if compacted and remaining:  # rows are partitioned one by one: list scheduling's bound, mean load + largest row
        slowest = max(sum(remaining[i] for wave in rank for i in wave) for rank in plan)
        assert slowest <= sum(remaining) / num_ranks + max(remaining) + 1e-9
    if num_ranks == 1:
        assert all(origin[i] == 0 for wave in plan[0] for i in wave)


def test_rebucket_moves_rows_off_the_rank_that_kept_the_long_ones():
    remaining = [300.0, 280.0, 260.0, 250.0, 5.0, 4.0, 3.0, 2.0]
    origin = [0, 0, 0, 0, 1, 1, 1, 1]
    plan = schedule.rebucket(remaining, origin, 2, 2, compacted=False)
    assert any(origin[i] != rank for rank, waves in enumerate(plan) for wave in waves for i in wave)  # rows moved
    per_rank = [sum(schedule.wave_cost(remaining, w, False) for w in rank) for rank in plan]
    assert sorted(per_rank) == [2 * 260 + 2 * 5 + 2 * 3, 2 * 300]  # in place, rank 0 would decode 2·300 + 2·260
    with pytest.raises(ValueError, match="origin"):
        schedule.rebucket(remaining, [0] * 7, 2, 2, compacted=False)
    with pytest.raises(ValueError, match="wave_size"):
        schedule.rebucket(remaining, origin, 2, 0, compacted=False)


def test_auto_compaction_is_off_only_where_it_would_change_tokens():
    from rl_lenbalance.config import LenBalanceConfig

    config = LenBalanceConfig()
    assert config.compaction == config.training_plan == "auto"
    greedy = config.resolved(compaction_changes_tokens=False)
    assert greedy.compaction == greedy.training_plan == "auto"  # both measured in the run, on any device
    with pytest.raises(ValueError,
                       match="lenbalance.training_plan='sortd' is not valid; use 'auto', 'off' or one of stock"):
        LenBalanceConfig(training_plan="sortd")
    assert config.resolved(compaction_changes_tokens=True).compaction is False
    assert LenBalanceConfig(compaction=True).resolved(True).compaction is True  # an explicit choice stays
    assert LenBalanceConfig(compaction=False).resolved(False).compaction is False
    with pytest.raises(ValueError, match="lenbalance.compaction='fals'.*true, false or 'auto'"):
        LenBalanceConfig(compaction="fals")
