"""Offline estimate of speculative decoding with n-gram ("prompt lookup") drafts from a GRPO group's own text.

Pure functions over token lists; `benchmarks/spec_offline.py` feeds them real rollouts, the policy's teacher-forced
probabilities and measured decode-step costs.

Two estimates of the decode steps a row needs:
- the lockstep walk: speculative sampling outputs text distributed exactly as the policy's, and with a deterministic
  drafter the steps a text needs are a function of the text (a step accepts the draft's longest prefix that agrees
  with the text, then emits one more token). Walking sampled rollouts therefore gives an unbiased sample of the steps
  speculation would take, siblings' drafts included (all rows of a group advance in lockstep, as in a batch);
- the position-averaged expectation: at every position, the expected accepted tokens of a one-hot draft,
  `sum_i prod_{j<=i} p(d_j)`, with each p known from the teacher-forced pass only while the draft agrees with the
  sampled text (terms past the first disagreement are unknown and counted as 0: a lower bound per position).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

import numpy as np

NgramIndex = dict[tuple[int, ...], list[int]]


def ngram_index(tokens: Sequence[int], max_n: int = 3) -> NgramIndex:
    """Start positions (ascending) of every n-gram of `tokens`, n = 1..max_n."""
    index: NgramIndex = {}
    for n in range(1, max_n + 1):
        for start in range(len(tokens) - n + 1):
            index.setdefault(tuple(tokens[start:start + n]), []).append(start)
    return index


def draft(own: Sequence[int], own_index: NgramIndex, visible: int, k: int,
          others: Sequence[tuple[Sequence[int], NgramIndex, int]] = (), max_n: int = 3, min_n: int = 1
          ) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the last n tokens of `own[:visible]`.

    n goes from `max_n` down to `min_n` (longest match first); for each n, `own[:visible]` (prompt and output so far) is
    searched first, then each `(tokens, index, visible)` of `others` (siblings' outputs so far), each only within
    its visible part. An empty list when nothing matches.
    """
    for n in range(min(max_n, visible), min_n - 1, -1):
        suffix = tuple(own[visible - n:visible])
        for tokens, index, seen in ((own, own_index, visible), *others):
            starts = index.get(suffix, ())
            i = bisect.bisect_left(starts, seen - n)  # an occurrence with at least one visible token after it
            if i:
                start = starts[i - 1] + n
                return list(tokens[start:min(start + k, seen)])
    return []


def match_length(proposal: Sequence[int], text: Sequence[int]) -> int:
    """How many leading tokens of `proposal` equal `text`'s."""
    count = 0
    for a, b in zip(proposal, text):
        if a != b:
            break
        count += 1
    return count


def expected_accepted(probs: Sequence[float]) -> float:
    """Expected accepted tokens of a one-hot draft whose i-th token the policy gives probability probs[i] (given the
    draft's earlier tokens): token i is accepted with probability probs[i] once all before it were."""
    total, survive = 0.0, 1.0
    for p in probs:
        survive *= p
        total += survive
    return total


def lockstep_walk(prompt: Sequence[int], texts: Sequence[Sequence[int]], k: int, siblings: bool, cap: int,
                  max_n: int = 3, min_n: int = 1) -> list[list[tuple[int, int]]]:
    """Per row of one group, `(draft length, tokens advanced)` at each decode step of speculative decoding that
    produces `texts` (each row's completion, eos included if it ended), drafting up to `k` tokens (never past `cap`
    new tokens) from the row's prompt and output so far and, with `siblings`, the others' outputs so far."""
    own = [list(prompt) + list(text) for text in texts]
    own_index = [ngram_index(tokens, max_n) for tokens in own]
    out_index = [ngram_index(text, max_n) for text in texts]
    position = [0] * len(texts)
    walks: list[list[tuple[int, int]]] = [[] for _ in texts]
    while any(pos < len(text) for pos, text in zip(position, texts)):
        before = list(position)  # siblings see each other's text as of the step's start
        for row, text in enumerate(texts):
            pos = before[row]
            if pos >= len(text):
                continue
            others = [(texts[o], out_index[o], before[o]) for o in range(len(texts)) if o != row] if siblings else ()
            proposal = draft(own[row], own_index[row], len(prompt) + pos, min(k, cap - pos - 1), others, max_n, min_n)
            advanced = min(match_length(proposal, text[pos:]) + 1, len(text) - pos)
            walks[row].append((len(proposal), advanced))
            position[row] += advanced
    return walks


def position_drafts(prompt: Sequence[int], texts: Sequence[Sequence[int]], row: int, k: int, siblings: bool,
                    cap: int, max_n: int = 3) -> list[list[int]]:
    """The draft at every position of `texts[row]` when its own output so far is given (the teacher-forced view),
    siblings' outputs visible up to the same position (stock's lockstep)."""
    own = list(prompt) + list(texts[row])
    own_index = ngram_index(own, max_n)
    out_index = [ngram_index(text, max_n) for text in texts]
    drafts = []
    for pos in range(len(texts[row])):
        others = [(texts[o], out_index[o], min(pos, len(texts[o]))) for o in range(len(texts))
                  if o != row] if siblings else ()
        drafts.append(draft(own, own_index, len(prompt) + pos, min(k, cap - pos - 1), others, max_n))
    return drafts


# ------------------------------------------------------------------------------------------------------- cost side

Schedule = list[tuple[int, float]]  # per decode step: (rows in the batch, positions verified per row)


def interpolated_cost(table: dict[tuple[int, int], float]) -> Callable[[int, int], float]:
    """Seconds of a decode step at (rows, positions per row), linear between the measured grid points in each
    direction, held at the edge outside it."""
    rows = sorted({r for r, _ in table})
    positions = sorted({p for _, p in table})
    grid = np.array([[table[r, p] for p in positions] for r in rows])

    def cost(r: int, p: float) -> float:
        by_rows = [float(np.interp(r, rows, grid[:, j])) for j in range(len(positions))]
        return float(np.interp(p, positions, by_rows))

    return cost


def stock_schedule(lengths: Sequence[int], compaction: bool = False) -> Schedule:
    """`generate` (every row decodes until the longest ends) or the compacting loop (finished rows leave)."""
    return [(sum(length > step for length in lengths) if compaction else len(lengths), 1)
            for step in range(max(lengths))]


def walk_schedule(walks: Sequence[Sequence[tuple[int, int]]], k: int, verify: str = "fixed") -> Schedule:
    """Speculation's decode steps, finished rows leaving. Positions verified per row: `fixed`, k + 1 for every
    row; `matched`, 1 + the longest draft any running row found (a padded batch; 1 when none matched: a plain
    step); `ragged`, 1 + the running rows' mean draft length (a batch without padding, each row its own length)."""
    if verify not in ("fixed", "matched", "ragged"):
        raise ValueError(f"verify must be 'fixed', 'matched' or 'ragged', got {verify!r}")
    schedule = []
    for step in range(max(len(walk) for walk in walks)):
        drafts = [walk[step][0] for walk in walks if len(walk) > step]
        positions = {"fixed": k + 1, "matched": 1 + max(drafts), "ragged": 1 + sum(drafts) / len(drafts)}[verify]
        schedule.append((len(drafts), positions))
    return schedule


def averaged_schedule(lengths: Sequence[int], tokens_per_step: Sequence[float], k: int) -> Schedule:
    """Speculation's decode steps when row i advances `tokens_per_step[i]` tokens every step (k + 1 positions)."""
    steps = [math.ceil(length / rate) for length, rate in zip(lengths, tokens_per_step)]
    return [(sum(s > step for s in steps), k + 1) for step in range(max(steps))]


def schedule_seconds(schedule: Schedule, cost: Callable[[int, int], float]) -> float:
    return sum(cost(rows, positions) for rows, positions in schedule)
