"""Generation waves: rows cut longest-first, and the decode slots a padded wave spends."""

from __future__ import annotations

from collections.abc import Sequence


def _longest_first(lengths: Sequence[float]) -> list[int]:
    """Indices sorted by length descending; ties keep index order."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def waves_by_length(lengths: Sequence[float], wave_size: int) -> list[list[int]]:
    """Cut the longest-first order into consecutive waves of at most `wave_size` rows, longest wave first."""
    if wave_size < 1:
        raise ValueError(f"wave_size must be at least 1, got {wave_size}")
    order = _longest_first(lengths)
    return [order[s:s + wave_size] for s in range(0, len(order), wave_size)]


def padded_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Tokens computed when each batch is padded to its longest row."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
