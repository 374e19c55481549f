"""Length-sorted orderings of rows: generation waves, equal-row micro-batches, token-budget micro-batches."""

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


def sorted_equal_chunks(lengths: Sequence[float], num_chunks: int) -> list[list[int]]:
    """Cut the longest-first order into `num_chunks` consecutive chunks of equal row count."""
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be at least 1, got {num_chunks}")
    if len(lengths) % num_chunks:
        raise ValueError(f"cannot split {len(lengths)} rows into {num_chunks} equal chunks: "
                         f"{len(lengths)} is not divisible by {num_chunks}")
    size = len(lengths) // num_chunks
    order = _longest_first(lengths)
    return [order[c * size:(c + 1) * size] for c in range(num_chunks)]


def token_budget_microbatches(lengths: Sequence[float], max_tokens: int,
                              max_rows: int | None = None) -> list[list[int]]:
    """Greedily pack the longest-first order into micro-batches whose padded size (rows times the longest
    row) stays within `max_tokens`, with at most `max_rows` rows each when given."""
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    batches: list[list[int]] = []
    for i in _longest_first(lengths):
        if lengths[i] > max_tokens:
            raise ValueError(f"a sequence of length {lengths[i]} exceeds the token budget max_tokens={max_tokens}; "
                             f"raise max_tokens to at least {lengths[i]}")
        batch = batches[-1] if batches else None
        if (batch and (len(batch) + 1) * lengths[batch[0]] <= max_tokens
                and (max_rows is None or len(batch) < max_rows)):
            batch.append(i)
        else:
            batches.append([i])
    return batches


def padded_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Tokens computed when each batch is padded to its longest row."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches if b)


def real_tokens(lengths: Sequence[int]) -> int:
    """Tokens that are not padding."""
    return sum(lengths)
