"""The padding ledger: tokens computed vs real, and what stock TRL would have computed for the same batch."""

from __future__ import annotations

from collections.abc import Sequence


def decode_slots(lengths: Sequence[int], calls: Sequence[Sequence[int]]) -> int:
    """Decode slots spent by generate calls over these rows: each row runs until the longest row of its call ends."""
    return sum(len(rows) * max(lengths[i] for i in rows) for rows in calls if rows)


def waste(computed: float, real: float) -> float:
    """Fraction of computed tokens that were padding."""
    return 1.0 - real / computed if computed else 0.0
