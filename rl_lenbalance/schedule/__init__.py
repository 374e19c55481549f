"""Pure scheduling functions: balanced partitions across ranks and length-sorted batching."""

from .batching import padded_tokens, real_tokens, sorted_equal_chunks, token_budget_microbatches, waves_by_length
from .partition import (
    PARTITIONERS,
    best_partition,
    imbalance,
    karmarkar_karp,
    lpt_partition,
    partition_groups,
    sequence_costs,
)
from .plan import padded_cost, plan_microbatches
from .rebucket import rebucket, rows_moved, wave_cost

__all__ = [
    "PARTITIONERS",
    "best_partition",
    "imbalance",
    "karmarkar_karp",
    "lpt_partition",
    "padded_cost",
    "padded_tokens",
    "plan_microbatches",
    "partition_groups",
    "real_tokens",
    "rebucket",
    "rows_moved",
    "sequence_costs",
    "sorted_equal_chunks",
    "token_budget_microbatches",
    "wave_cost",
    "waves_by_length",
]
