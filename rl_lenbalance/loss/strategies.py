"""Loss-phase strategies: the exact ways of cutting a generation batch's rows into micro-batches, and of running each
micro-batch's loss forward (framework-free: the TRL adapter gathers the rows' lengths and calls these).

A strategy has two jobs: `plan` (row lengths in, micro-batches out: which rows each micro-batch of this rank holds)
and `layout` (a micro-batch in, the `Layout` its loss forward runs with). Every strategy trains each row in the
optimizer step stock TRL's shuffle gives it, so the update is stock's wherever the strategy is exact. Strategies that
regroup rows (move a row into another micro-batch than stock's) are exact only when nothing TRL computes per
micro-batch depends on which rows share it; `regrouping_blockers` lists what does.

A new strategy is one class (here or in its own module of this package) and one entry of `loss.STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..schedule import TrainingPlan, plan_training
from .packed import packed_logps_and_entropies

ROW_MEAN_LOSSES = ("grpo", "dr_grpo", "sapo", "luspo")  # a micro-batch's loss is a mean over its rows
GLOBAL_LOSSES = ("dapo", "cispo", "vespo")  # normalised by the whole generation batch's tokens (`num_items_in_batch`)
LAYOUT_KEY = "lenbalance_layout"  # where a micro-batch (a TRL batch dict) carries its `Layout`

Forward = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]  # (model, ids, mask, keep, temperature, entropy)


@dataclass(frozen=True)
class PassRows:
    """What a plan sees of one generation batch: per row its completion and prompt lengths, its optimizer step (from
    stock's shuffle) and its prompt group, numbered rank-major over `num_ranks` equal blocks (every rank's rows when
    the strategy may move rows between ranks, else this rank's only, `num_ranks` 1)."""

    completion_lengths: list[int]
    prompt_lengths: list[int]
    steps: list[int]
    groups: list[int]
    shuffle: list[int]  # stock's permutation of this rank's rows
    num_ranks: int
    rank: int
    steps_per_generation: int
    microbatches_per_step: int
    attention_alpha: float = 0.0
    partition_method: str = "best"


@dataclass(frozen=True)
class Layout:
    """How one micro-batch's loss forward runs: `forward` None is stock's padded forward; otherwise each part (rows
    of the micro-batch) runs through `forward` on its own and the scores are put back in the rows' order."""

    name: str = "padded"
    parts: tuple[tuple[int, ...], ...] = ()
    tokens: int = 0  # tokens the model computes for this micro-batch
    forward: Forward | None = None

    def run(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
            temperature: float, compute_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward` over each part, as TRL's `_get_per_token_logps_and_entropies` returns them: `(B, keep)`."""
        if len(self.parts) == 1:
            return self.forward(model, input_ids, attention_mask, logits_to_keep, temperature, compute_entropy)
        outputs, order = [], []
        for part in self.parts:
            index = torch.tensor(part, device=input_ids.device)
            outputs.append(self.forward(model, input_ids[index], attention_mask[index], logits_to_keep, temperature,
                                        compute_entropy))
            order += part
        inverse = torch.empty(len(order), dtype=torch.long, device=input_ids.device)
        inverse[torch.tensor(order, device=input_ids.device)] = torch.arange(len(order), device=input_ids.device)
        logps = torch.cat([out[0] for out in outputs])[inverse]
        entropies = torch.cat([out[1] for out in outputs])[inverse] if compute_entropy else None
        return logps, entropies


def padded_tokens(batch: dict) -> int:
    """Tokens stock's padded forward computes for a micro-batch: every row at the batch's width."""
    return batch["prompt_ids"].numel() + batch["completion_ids"].numel()


def real_lengths(batch: dict) -> list[int]:
    """Each row's real tokens (prompt plus completion)."""
    return (batch["prompt_mask"].sum(1) + batch["completion_mask"].sum(1)).tolist()


def parts_under(costs: Sequence[int], budget: int | None) -> tuple[tuple[int, ...], ...]:
    """Consecutive rows cut into parts of at most `budget` summed cost (None: one part); a row over the budget runs
    alone."""
    parts: list[list[int]] = [[]]
    load = 0
    for row, cost in enumerate(costs):
        if budget is not None and parts[-1] and load + cost > budget:
            parts.append([])
            load = 0
        parts[-1].append(row)
        load += cost
    return tuple(tuple(part) for part in parts)


@dataclass(frozen=True)
class Strategy:
    """A loss-phase strategy that keeps stock's micro-batches (`stock`; `stock_trimmed` with `trims`)."""

    name: str
    help: str
    regroups: bool = False  # rows leave stock's micro-batches (length-sorted, maybe across ranks)
    uneven: bool = False  # micro-batches may hold different numbers of rows (row-mean losses are reweighted)
    trims: bool = False  # columns that are padding in every row of a micro-batch are cut
    moves_rows: bool = False  # a row may train on another rank than the one that generated it

    def unsupported(self, model: torch.nn.Module) -> str | None:
        """None when this strategy's forward gives `model` stock's numbers, else why not."""
        return None

    def plan(self, rows: PassRows) -> TrainingPlan:
        """This rank's rows in micro-batch order and the micro-batches' sizes: stock TRL's (its shuffle, cut into
        `steps_per_generation` equal parts; nothing moves between ranks)."""
        return stock_plan(rows.shuffle, rows.steps_per_generation)

    def layout(self, batch: dict, dense_max_tokens: int | None) -> Layout:
        """The loss forward of micro-batch `batch` (`dense_max_tokens`: the longest sequence one forward may run under
        a dense (N, N) mask; None when the attention kernel skips masked blocks)."""
        return Layout(tokens=padded_tokens(batch))


@dataclass(frozen=True)
class Sorted(Strategy):
    """Length-sorted micro-batches, dealt to ranks by padded cost (`schedule.plan_training`)."""

    regroups: bool = True
    trims: bool = True
    moves_rows: bool = True

    def plan(self, rows: PassRows) -> TrainingPlan:
        return plan_training(rows.completion_lengths, rows.prompt_lengths, rows.steps, rows.num_ranks, rows.rank,
                             rows.microbatches_per_step, rows.attention_alpha, rows.partition_method, self.uneven)


@dataclass(frozen=True)
class Packed(Sorted):
    """`sorted_uneven`'s micro-batches, each run padding-free (`rl_lenbalance.loss.packed`), in parts of at most
    `dense_max_tokens` tokens under a dense mask."""

    uneven: bool = True

    def unsupported(self, model: torch.nn.Module) -> str | None:
        from .packed import packing_unsupported

        return packing_unsupported(model)

    def layout(self, batch: dict, dense_max_tokens: int | None) -> Layout:
        lengths = real_lengths(batch)
        return Layout("packed", parts_under(lengths, dense_max_tokens), sum(lengths), pack_forward)


def pack_forward(model, input_ids, attention_mask, logits_to_keep, temperature, compute_entropy):
    """`packing.packed_logps_and_entropies` through TRL's fused LM head (stock's numbers, no logits)."""
    return packed_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, temperature, compute_entropy,
                                      fused_lm_head=True)


def regrouping_blockers(loss_type: str | None, entropy_coef: float = 0.0, use_adaptive_entropy: bool = False,
                        top_entropy_quantile: float = 1.0, router_aux_loss: bool = False) -> list[str]:
    """The trainer settings under which regrouping rows would change what is learned (empty: every strategy is
    exact). `loss_type` None is RLOO's loss, a mean over sequences."""
    blockers = []
    if loss_type is not None and loss_type not in ROW_MEAN_LOSSES + GLOBAL_LOSSES:
        blockers.append(f"loss_type={loss_type!r} (normalised by each micro-batch's own tokens)")
    if entropy_coef:
        blockers.append(f"entropy_coef={entropy_coef} (a per-micro-batch entropy mean)")
    if use_adaptive_entropy:
        blockers.append("use_adaptive_entropy=True (a per-micro-batch entropy mean)")
    if top_entropy_quantile < 1.0:
        blockers.append(f"top_entropy_quantile={top_entropy_quantile} (a per-micro-batch entropy quantile)")
    if router_aux_loss:
        blockers.append("router_aux_loss_coef != 0 (a per-micro-batch MoE load-balancing loss)")
    return blockers


def stock_plan(shuffle: Sequence[int], steps_per_generation: int) -> TrainingPlan:
    """Stock TRL's micro-batches of one rank: its rows permuted by `shuffle`, cut into `steps_per_generation` equal
    parts (row indices are the rank's own: nothing moves between ranks)."""
    size = len(shuffle) // steps_per_generation
    return TrainingPlan(list(shuffle), 0, [size] * steps_per_generation, 0, False)
