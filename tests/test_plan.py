"""The training-side plan: equal micro-batches of neighbours in length, dealt to ranks by padded cost."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rl_lenbalance.schedule import (
    best_partition,
    imbalance,
    karmarkar_karp,
    lpt_partition,
    padded_cost,
    plan_microbatches,
)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.data())
def test_plan_keeps_every_row_once_in_equal_microbatches(ranks, per_rank, rows, data):
    lengths = data.draw(st.lists(st.integers(1, 4096), min_size=ranks * per_rank * rows,
                                 max_size=ranks * per_rank * rows))
    plan = plan_microbatches(lengths, ranks, per_rank)
    assert len(plan) == ranks and all(len(r) == per_rank for r in plan)
    flat = [i for rank in plan for mb in rank for i in mb]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(len(mb) == rows for rank in plan for mb in rank)


def test_plan_pads_less_than_any_random_split_and_balances_ranks():
    lengths = [5, 400, 7, 390, 6, 380, 8, 370, 9, 10, 11, 12, 300, 13, 14, 15]
    plan = plan_microbatches(lengths, 2, 2)
    padded = sum(padded_cost(lengths, mb) for rank in plan for mb in rank)
    stock = sum(padded_cost(lengths, lengths_slice) for lengths_slice in
                [list(range(k, k + 4)) for k in range(0, 16, 4)])  # TRL-style: neighbours in arrival order
    assert padded < 0.7 * stock
    per_rank = [sum(padded_cost(lengths, mb) for mb in rank) for rank in plan]
    assert max(per_rank) / (sum(per_rank) / 2) < 1.5
    # the longest rows share a micro-batch
    assert sorted(max(plan, key=lambda r: max(lengths[i] for mb in r for i in mb))[0]) == [1, 3, 5, 7]


def test_plan_rejects_uneven_splits():
    with pytest.raises(ValueError, match="10 rows cannot be cut into 2 ranks × 2 equal micro-batches"):
        plan_microbatches(list(range(10)), 2, 2)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1e4), min_size=8, max_size=64), st.integers(2, 4))
def test_best_partition_is_never_worse_than_either(costs, parts):
    costs = costs[: len(costs) - len(costs) % parts]
    best = imbalance(costs, best_partition(costs, parts))
    assert best <= imbalance(costs, karmarkar_karp(costs, parts)) + 1e-12
    assert best <= imbalance(costs, lpt_partition(costs, parts)) + 1e-12


def test_plan_with_prompt_widths_groups_rows_by_both_widths():
    # total length alone pairs (40 + 20) with (28 + 32): a 72-wide micro-batch for 60-token rows
    completion, prompt = [20, 32, 20, 32], [40, 28, 40, 28]
    plan = plan_microbatches(completion, 1, 2, prompt_lengths=prompt)
    assert sorted(map(sorted, plan[0])) == [[0, 2], [1, 3]]
    assert sum(padded_cost(completion, mb, prompt_lengths=prompt) for mb in plan[0]) == 4 * 60


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 5), st.booleans(), st.data())
def test_plan_keeps_rows_and_steps_and_never_outdoes_stock_in_time_or_memory(ranks, per_rank, rows, uneven, data):
    """Stock TRL pads every micro-batch of a rank to that rank's longest prompt plus its longest completion."""
    n = ranks * per_rank * rows
    completion = data.draw(st.lists(st.integers(1, 512), min_size=n, max_size=n))
    prompt = data.draw(st.lists(st.integers(1, 64), min_size=n, max_size=n))
    plan = plan_microbatches(completion, ranks, per_rank, prompt_lengths=prompt, uneven=uneven)
    assert sorted(i for rank in plan for mb in rank for i in mb) == list(range(n))
    assert all(len(rank) == per_rank and all(rank) for rank in plan)
    assert all(sum(map(len, rank)) == n // ranks for rank in plan)  # a rank trains as many rows as stock
    assert len({tuple(map(len, rank)) for rank in plan}) == 1  # micro-step k has the same rows on every rank

    def cost(p):
        per_rank_cost = [sum(padded_cost(completion, mb, prompt_lengths=prompt) for mb in rank) for rank in p]
        return max(per_rank_cost), sum(per_rank_cost)

    block = n // ranks
    stock = [padded_cost(completion, range(r * block, (r + 1) * block), prompt_lengths=prompt) for r in range(ranks)]
    assert cost(plan)[0] <= max(stock)  # the slowest rank computes no more than stock's slowest
    assert max(padded_cost(completion, mb, prompt_lengths=prompt) for rank in plan for mb in rank) <= max(
        stock) / per_rank  # no micro-batch outgrows stock's largest: same peak memory
    if uneven:
        assert cost(plan) <= cost(plan_microbatches(completion, ranks, per_rank, prompt_lengths=prompt))


def test_uneven_microbatches_give_the_long_tail_its_own_small_microbatch():
    completion, prompt = [300, 10, 12, 8, 9, 11, 280, 7], [5] * 8
    plan = plan_microbatches(completion, 1, 2, prompt_lengths=prompt, uneven=True)
    assert [sorted(mb) for mb in plan[0]] == [[0, 6], [1, 2, 3, 4, 5, 7]]
    assert sum(padded_cost(completion, mb, prompt_lengths=prompt) for mb in plan[0]) == 2 * 305 + 6 * 17
