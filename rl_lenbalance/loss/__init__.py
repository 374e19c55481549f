"""The loss phase, framework-free (torch and transformers only, no TRL import): its strategies (how a generation
batch's rows become micro-batches, and how each micro-batch's loss forward runs) and their forwards.

`STRATEGIES` lists them by name, stock first; a pass logs its strategy by name (`autotune/strategy/<name>`).
"""

from .shared_prompt import (
    SharedPrompt,
    plan_shared_prompt,
    prompt_groups,
    shared_prompt_logps_and_entropies,
    shared_prompt_unsupported,
)
from .strategies import (
    GLOBAL_LOSSES,
    LAYOUT_KEY,
    ROW_MEAN_LOSSES,
    Layout,
    Packed,
    PassRows,
    Sorted,
    Strategy,
    regrouping_blockers,
    stock_plan,
)

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("stock", "TRL's own shuffle and equal split, every row padded to the batch's width"),
    Strategy("stock_trimmed", "stock's rows in each micro-batch, with the all-padding columns cut (exact under every "
             "TRL setting)", trims=True),
    Sorted("sorted", "length-sorted micro-batches of stock's row count, dealt to ranks by padded cost, padding "
           "trimmed"),
    Sorted("sorted_uneven", "length-sorted micro-batches of any row count (long rows in small ones), none wider than "
           "stock's", uneven=True),
    Packed("packed", "sorted_uneven's micro-batches, each run as padding-free sequences (`rl_lenbalance.loss.packed`): "
           "logits only at real completion tokens"),
    SharedPrompt("shared_prompt", "each prompt's rows in one micro-batch where they fit, run as prompt trees: each "
                 "group's prompt computed once (`rl_lenbalance.loss.shared_prompt`)"),
)}


def exact_strategies(blockers: list[str]) -> list[str]:
    """The strategies that give stock's update under settings with these `regrouping_blockers`, stock first."""
    return [name for name, s in STRATEGIES.items() if not (s.regroups and blockers)]


__all__ = ["GLOBAL_LOSSES", "LAYOUT_KEY", "ROW_MEAN_LOSSES", "STRATEGIES", "Layout", "Packed", "PassRows",
           "SharedPrompt", "Sorted", "Strategy",
           "exact_strategies", "plan_shared_prompt", "prompt_groups", "regrouping_blockers",
           "shared_prompt_logps_and_entropies", "shared_prompt_unsupported", "stock_plan"]
