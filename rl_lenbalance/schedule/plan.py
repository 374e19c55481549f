"""Training-side plan: which rows each data-parallel rank trains, in which micro-batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .partition import PARTITIONERS

Plan = list[list[list[int]]]  # rank -> micro-batch -> row indices


def padded_cost(lengths: Sequence[float], rows: Sequence[int], attention_alpha: float = 0.0,
                prompt_lengths: Sequence[float] | None = None) -> float:
    """Cost of running `rows` as one padded micro-batch: rows × (W + α·W²).

    W is the longest row; with `prompt_lengths`, `lengths` are completion lengths and W is the longest prompt plus
    the longest completion, since TRL pads prompts on the left and completions on the right.
    """
    width = max(lengths[i] for i in rows)
    if prompt_lengths is not None:
        width += max(prompt_lengths[i] for i in rows)
    return _cost(len(rows), width, attention_alpha)


def _cost(rows: int, width: float, attention_alpha: float) -> float:
    return rows * (width + attention_alpha * width * width)


def split_rows(ranks: Sequence[Sequence[int]], num_parts: int, lengths: Sequence[float], max_cost: float,
               attention_alpha: float = 0.0, prompt_lengths: Sequence[float] | None = None) -> Plan | None:
    """Cut each rank's rows (in their order; every rank has as many) at the same points into exactly `num_parts`
    non-empty consecutive micro-batches, of least summed `padded_cost`, none costing more than `max_cost` (dynamic
    programming over the cut points). Shared cut points give micro-step k the same rows on every rank, as TRL's
    per-row metric gathers need. None when no such cut exists."""
    n = len(ranks[0])
    if not 1 <= num_parts <= n or any(len(rows) != n for rows in ranks):
        return None
    prompts = prompt_lengths or [0] * len(lengths)
    inf = float("inf")
    seg = [[inf] * (n + 1) for _ in range(n)]  # seg[i][j]: every rank's rows[i:j] as one micro-batch each
    for i in range(n):
        widest = [(0.0, 0.0)] * len(ranks)  # each rank's longest completion and prompt in rows[i:j]
        for j in range(i + 1, n + 1):
            widest = [(max(c, lengths[rows[j - 1]]), max(p, prompts[rows[j - 1]]))
                      for (c, p), rows in zip(widest, ranks, strict=True)]
            costs = [_cost(j - i, c + p, attention_alpha) for c, p in widest]
            if max(costs) > max_cost:
                break  # a longer micro-batch only costs more
            seg[i][j] = sum(costs)
    best = [[inf] * (n + 1) for _ in range(num_parts + 1)]  # best[k][j]: rows[:j] in k micro-batches
    cut = [[0] * (n + 1) for _ in range(num_parts + 1)]
    best[0][0] = 0.0
    for k in range(1, num_parts + 1):
        for j in range(k, n - (num_parts - k) + 1):
            best[k][j], cut[k][j] = min((best[k - 1][i] + seg[i][j], i) for i in range(k - 1, j))
    if best[num_parts][n] == inf:
        return None
    bounds, j = [n], n
    for k in range(num_parts, 0, -1):
        j = cut[k][j]
        bounds.append(j)
    bounds.reverse()
    return [[list(rows[a:b]) for a, b in zip(bounds, bounds[1:])] for rows in ranks]


def plan_microbatches(
    lengths: Sequence[float],
    num_ranks: int,
    microbatches_per_rank: int,
    attention_alpha: float = 0.0,
    method: str = "best",
    prompt_lengths: Sequence[float] | None = None,
    uneven: bool = False,
) -> Plan:
    """Rows of the whole generation batch → for each rank, its micro-batches (lists of row indices).

    Rows are sorted by length and cut into equal micro-batches of neighbours (least padding); the micro-batches
    are then dealt to ranks, an equal count each, so that the ranks' padded costs are balanced. Every micro-batch
    has the same number of rows, which keeps TRL's per-micro-batch loss normalisation unchanged.

    With `prompt_lengths` a row has two widths, so several sort orders are tried (total, completion first, prompt
    first), and so is each rank keeping its own rows (rank r's rows are the r-th consecutive block, as gathered)
    sorted in place. The plan whose slowest rank costs least wins, ties to the lowest total, then to keeping rows
    in place (no communication): its slowest rank never computes more than stock TRL's.

    With `uneven`, each candidate is also tried with its ranks' rows cut anew, in length order, into micro-batches
    of any row count (long rows in small ones, short rows in large ones; micro-step k has the same rows on every
    rank). The loss must then weight each micro-batch by its rows. No plan's micro-batch costs more than stock's
    largest (the peak memory of the loss phase stays).
    """
    count = num_ranks * microbatches_per_rank
    if len(lengths) % count:
        raise ValueError(
            f"{len(lengths)} rows cannot be cut into {num_ranks} ranks × {microbatches_per_rank} equal micro-batches."
        )
    size = len(lengths) // count

    def cost(rows: Sequence[int]) -> float:
        return padded_cost(lengths, rows, attention_alpha, prompt_lengths)

    def chunks(rows: Sequence[int], key: Callable[[int], tuple]) -> list[list[int]]:
        order = sorted(rows, key=key)
        return [order[k * size : (k + 1) * size] for k in range(len(order) // size)]

    def dealt(batches: list[list[int]]) -> Plan:
        if num_ranks == 1:
            return [batches]
        parts = PARTITIONERS[method]([cost(rows) for rows in batches], num_ranks, equal_size=True)
        return [[batches[b] for b in part] for part in parts]

    prompts = prompt_lengths or [0] * len(lengths)
    keys = [lambda i: (-(lengths[i] + prompts[i]), i)]
    if prompt_lengths is not None:
        keys += [lambda i: (-lengths[i], -prompts[i], i), lambda i: (-prompts[i], -lengths[i], i)]
    block = len(lengths) // num_ranks
    in_place = [chunks(range(r * block, (r + 1) * block), keys[0]) for r in range(num_ranks)]
    candidates = [in_place] + [dealt(chunks(range(len(lengths)), key)) for key in keys]  # ties keep rows in place
    # stock pads each micro-batch of rank r to r's widest prompt + widest completion: no plan may need more memory
    stock_peak = max(cost(range(r * block, (r + 1) * block)) / microbatches_per_rank for r in range(num_ranks))

    def score(plan: Plan) -> tuple[float, float]:
        per_rank = [sum(cost(rows) for rows in rank) for rank in plan]
        return max(per_rank), sum(per_rank)

    if uneven:
        for plan in list(candidates):
            recut = split_rows([sorted((i for rows in rank for i in rows), key=keys[0]) for rank in plan],
                               microbatches_per_rank, lengths, stock_peak, attention_alpha, prompt_lengths)
            if recut is not None:
                candidates.append(recut)
    fits = [plan for plan in candidates if max(cost(rows) for rank in plan for rows in rank) <= stock_peak]
    return min(fits, key=score)  # never empty: in place, a rank's micro-batches are no wider than its stock ones
