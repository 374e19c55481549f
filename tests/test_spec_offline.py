"""The pure parts of the offline speculative-decoding estimate (benchmarks/spec_offline.py)."""

import math

import pytest

from benchmarks.forelen.spec import (
    draft,
    expected_accepted,
    interpolated_cost,
    lockstep_walk,
    ngram_index,
    stock_schedule,
    walk_schedule,
)


def test_draft_prefers_the_longest_then_latest_match_and_stays_within_the_visible_text():
    own = [5, 1, 2, 9, 7, 2, 8, 1, 2]  # ends with (1, 2): seen before at 1..2, followed by 9, 7
    index = ngram_index(own)
    assert draft(own, index, len(own), k=3) == [9, 7, 2]
    # only the first 5 tokens visible: the suffix is (9, 7)... no earlier (2, 9, 7)/(9, 7)/(7): nothing to draft
    assert draft(own, index, 5, k=3) == []
    # the 1-gram (2) was seen twice; the latest occurrence with a visible token after it wins: 2 -> 8
    assert draft(own, index, 6, k=2) == [9, 7]  # visible [5,1,2,9,7,2]: last token 2, earlier 2 at index 2
    assert draft(own, index, 8, k=2) == [2, 9]  # visible ends with (8, 1): no; (1): at index 1 -> 2, 9
    # the continuation never reads past the visible part
    assert draft(own, index, 6, k=8) == [9, 7, 2]
    # with min_n = 2 a lone 1-gram match drafts nothing
    assert draft(own, index, 6, k=2, min_n=2) == []
    assert draft(own, index, len(own), k=3, min_n=2) == [9, 7, 2]


def test_draft_searches_siblings_only_up_to_what_they_have_generated():
    own, sibling = [3, 4], [4, 6, 6, 6]
    own_index, sibling_index = ngram_index(own), ngram_index(sibling)
    assert draft(own, own_index, 2, k=2) == []
    assert draft(own, own_index, 2, k=2, others=[(sibling, sibling_index, 1)]) == []  # sibling's 4 has nothing after
    assert draft(own, own_index, 2, k=2, others=[(sibling, sibling_index, 2)]) == [6]
    assert draft(own, own_index, 2, k=2, others=[(sibling, sibling_index, 4)]) == [6, 6]


def test_expected_accepted_of_a_one_hot_draft():
    assert expected_accepted([]) == 0.0
    assert expected_accepted([0.5, 0.4]) == pytest.approx(0.5 + 0.5 * 0.4)
    assert expected_accepted([0.9, 0.5, 0.2]) == pytest.approx(0.9 + 0.45 + 0.09)
    assert expected_accepted([1.0] * 4) == 4.0


def test_lockstep_walk_accepts_the_drafted_prefix_that_the_text_continues_with():
    # a repetition loop: after one period the row's own text drafts the rest
    text = [1, 2, 3, 1, 2, 3, 1, 2, 3, 0]
    (walk,) = lockstep_walk([9], [text], k=3, siblings=False, cap=128)
    assert sum(advanced for _, advanced in walk) == len(text)
    # 1, 2, 3, 1 one by one (nothing earlier to match); then the 1-gram (1) drafts [2, 3, 1], all accepted, plus one
    # more token; then (3, 1, 2) drafts [3, 1, 2]: 3 accepted, the text ends with 0 instead of 1
    assert walk == [(0, 1)] * 4 + [(3, 4), (3, 2)]
    # k = 0: one token per step
    (plain,) = lockstep_walk([9], [text], k=0, siblings=False, cap=128)
    assert plain == [(0, 1)] * len(text)


def test_lockstep_walk_lets_a_row_draft_from_a_sibling_already_ahead():
    texts = [[5, 6, 7, 8, 9, 0], [5, 6, 5, 6, 7, 8, 9, 0]]
    alone = lockstep_walk([1], texts, k=4, siblings=False, cap=128)
    together = lockstep_walk([1], texts, k=4, siblings=True, cap=128)
    # row 1 drafts [6, 5] from itself at its 4th step (1 accepted), so it is ahead of row 0; at its 5th step the
    # suffix (6, 7) occurs only in row 0's 4 tokens so far, which continue with 8: drafted and accepted
    assert alone[1] == [(0, 1)] * 3 + [(2, 2)] + [(0, 1)] * 3
    assert together[1] == [(0, 1)] * 3 + [(2, 2), (1, 2), (0, 1)]
    assert alone[0] == together[0] == [(0, 1)] * 6


def test_schedules_and_interpolated_cost():
    cost = interpolated_cost({(1, 1): 1.0, (1, 3): 2.0, (9, 1): 3.0, (9, 3): 6.0})
    assert cost(5, 1) == pytest.approx(2.0)
    assert cost(5, 2) == pytest.approx((2.0 + 4.0) / 2)
    assert cost(20, 3) == pytest.approx(6.0)  # held at the edge
    assert stock_schedule([3, 1]) == [(2, 1)] * 3
    assert stock_schedule([3, 1], compaction=True) == [(2, 1), (1, 1), (1, 1)]
    walks = [[(2, 3), (0, 1)], [(0, 1)]]
    assert walk_schedule(walks, k=2) == [(2, 3), (1, 3)]
    assert walk_schedule(walks, k=2, verify="matched") == [(2, 3), (1, 1)]
    assert walk_schedule(walks, k=2, verify="ragged") == [(2, 2), (1, 1)]
    assert math.isclose(sum(cost(r, p) for r, p in walk_schedule(walks, 2, "matched")), cost(2, 3) + cost(1, 1))
