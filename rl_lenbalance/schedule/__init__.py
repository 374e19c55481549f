"""Pure scheduling functions: balanced partitions across ranks, length-sorted waves and micro-batches, re-bucketing,
the loss-phase tuner's run-time choice, the training plan of a generation batch, and row selection /
padding trimming of a batch.

A new partitioning policy is one function `(costs, num_parts, equal_size) -> parts` added to `PARTITIONERS`; its key
becomes a valid `lenbalance.partition_method`.
"""

from .admission import admission_order, balance_rows
from .autotune import AUTO, OFF, Autotuner, decide
from .batch import fit_columns, take_rows, trim_padding
from .exchange import TrainingPlan, optimizer_steps, plan_training
from .partition import PARTITIONERS, best_partition, imbalance, karmarkar_karp, lpt_partition
from .plan import padded_cost, plan_microbatches
from .rebucket import rebucket, wave_cost
from .waves import padded_tokens, waves_by_length

__all__ = [
    "AUTO",
    "OFF",
    "PARTITIONERS",
    "Autotuner",
    "TrainingPlan",
    "admission_order",
    "balance_rows",
    "best_partition",
    "decide",
    "fit_columns",
    "imbalance",
    "karmarkar_karp",
    "lpt_partition",
    "optimizer_steps",
    "padded_cost",
    "padded_tokens",
    "plan_microbatches",
    "plan_training",
    "rebucket",
    "take_rows",
    "trim_padding",
    "wave_cost",
    "waves_by_length",
]
