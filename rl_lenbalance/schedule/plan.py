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
    return len(rows) * (width + attention_alpha * width * width)


def plan_microbatches(
    lengths: Sequence[float],
    num_ranks: int,
    microbatches_per_rank: int,
    attention_alpha: float = 0.0,
    method: str = "best",
    prompt_lengths: Sequence[float] | None = None,
) -> Plan:
    """Rows of the whole generation batch → for each rank, its micro-batches (lists of row indices).

    Rows are sorted by length and cut into equal micro-batches of neighbours (least padding); the micro-batches
    are then dealt to ranks, an equal count each, so that the ranks' padded costs are balanced. Every micro-batch
    has the same number of rows, which keeps TRL's per-micro-batch loss normalisation unchanged.

    With `prompt_lengths` a row has two widths, so several sort orders are tried (total, completion first, prompt
    first), and so is each rank keeping its own rows (rank r's rows are the r-th consecutive block, as gathered)
    sorted in place. The plan whose slowest rank costs least wins, ties to the lowest total, then to keeping rows
    in place (no communication): its slowest rank never computes more than stock TRL's.
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

    def score(plan: Plan) -> tuple[float, float]:
        per_rank = [sum(cost(rows) for rows in rank) for rank in plan]
        return max(per_rank), sum(per_rank)

    return min(candidates, key=score)
