"""The padding ledger: tokens computed vs real, and what stock TRL would have computed for the same batch."""

from __future__ import annotations

from collections.abc import Sequence


def decode_slots(lengths: Sequence[int], calls: Sequence[Sequence[int]]) -> int:
    """Decode slots spent by generate calls over these rows: each row runs until the longest row of its call ends."""
    return sum(len(rows) * max(lengths[i] for i in rows) for rows in calls if rows)


def loss_tokens(prompt_lengths: Sequence[int], completion_lengths: Sequence[int],
                microbatches: Sequence[Sequence[int]], prompt_width: int | None = None,
                completion_width: int | None = None) -> int:
    """Tokens run through the loss forward: each micro-batch is padded to its own widest prompt and completion,
    unless fixed widths (stock TRL pads every micro-batch to the generation batch's widths) are given."""
    total = 0
    for rows in microbatches:
        if not rows:
            continue
        p = prompt_width if prompt_width is not None else max(prompt_lengths[i] for i in rows)
        c = completion_width if completion_width is not None else max(completion_lengths[i] for i in rows)
        total += len(rows) * (p + c)
    return total


def waste(computed: float, real: float) -> float:
    """Fraction of computed tokens that were padding."""
    return 1.0 - real / computed if computed else 0.0
