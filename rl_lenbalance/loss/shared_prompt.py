"""The "shared_prompt" loss forward: each group's prompt computed once for all of its completions, with TRL 1.16's
per-token log-probs, entropies and gradients (torch and transformers only, no TRL import).

GRPO/RLOO sample G completions per prompt, and stock's loss forward carries the prompt G times. Here a micro-batch
(TRL's layout: left-padded prompt + right-padded completion, the last `logits_to_keep` columns the completion) runs
as ONE sequence `(1, N)` laid out as a tree per group:

    [p_0 .. p_{L-2}] [p_{L-1} c1_0 .. c1_{n1-2}] [p_{L-1} c2_0 ..] ... | next group ...

with a 4D mask: a token attends, causally, to its group's shared prompt and to its own branch. The prompt's last
token opens every branch, so that each position's next token is the next one in the sequence (TRL's fused LM head
shifts labels by one) and the first completion token is predicted from the prompt's last position, as in stock; it
costs one token per row. Positions are stock's (each token's column in the padded input, as `packed.py` keeps
them), so every token sees exactly the keys, values and positions it sees in stock's padded forward, and the
gradient through the shared prompt is the sum of stock's G copies. Logits are computed only at the positions that
predict a completion token.

Measured on CPU (tests/test_shared_prompt.py, tiny Llama, vs stock's padded forward): float64 sdpa log-probs 4e-15,
entropies 3e-14, parameter gradients 8e-8 relative, all of it Llama's RMSNorm, which transformers runs in float32 even
for a float64 model (a shared token's gradient is rounded once for its G uses, stock's once per copy); with the norm
in float64 the gradients agree to 1e-12. float32 (sdpa and eager): log-probs 2e-6, entropies 1.2e-5, gradients 3e-7
relative. The tree mask is dense (N x N): sdpa and eager compute attention over all of it, so micro-batches are kept
to a token budget (`plan_shared_prompt`). flex_attention (a block mask) and flash kernels (no 4D masks) are not
covered (`shared_prompt_unsupported`).

The other known way, the prompt's key/value cache computed once with gradients and indexed to the rows, was measured
against this one (benchmarks/shared_prompt_forward.py, SmolLM2-135M on 2 CPU cores, 2 groups of 8: tree 1.69x stock's
forward + backward, cache 1.26x, packed 1.28x) and not kept: it runs the completions padded, runs the model twice per
micro-batch (DDP's default reducer rejects two forwards before one backward), and transformers drops the cache under
activation checkpointing, TRL's default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..schedule import TrainingPlan
from .packed import (
    _text_config,
    _unwrap,
    checked_shapes,
    packed_logps_and_entropies,
    packing_unsupported,
    score_sequence,
)
from .strategies import Layout, PassRows, Strategy

__all__ = ["SharedPrompt", "plan_shared_prompt", "prompt_groups", "shared_prompt_logps_and_entropies",
           "shared_prompt_unsupported"]

TREE_MASK_IMPLEMENTATIONS = ("sdpa", "eager")  # take a dense 4D mask as given


def prompt_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    """`(B,)` group index per row, numbered from 0 in order of first appearance: rows with identical prompts (the
    same real tokens in the same columns) share one."""
    prompt_width = input_ids.shape[1] - int(logits_to_keep)
    key = input_ids[:, :prompt_width].masked_fill(attention_mask[:, :prompt_width] == 0, -1)
    inverse = torch.unique(key, dim=0, return_inverse=True)[1].tolist()
    numbers: dict[int, int] = {}
    return torch.tensor([numbers.setdefault(u, len(numbers)) for u in inverse], device=input_ids.device)


@dataclass
class _Tree:
    """One micro-batch as a sequence of prompt trees, and where its scores go in TRL's `(B, logits_to_keep)`."""

    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N) stock's positions: each token's column in the padded input
    allowed: torch.Tensor  # (N, N) bool: query i attends to key j
    predictors: torch.Tensor  # (K,) positions whose next token is a completion token
    rows: torch.Tensor  # (K,) its row
    columns: torch.Tensor  # (K,) its completion column


def _tree(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, groups: torch.Tensor | None,
          keep_last: bool) -> _Tree | None:
    """Lay the rows with a completion token out as prompt trees (None when no row has one). With `keep_last` each
    branch also holds its last completion token (TRL's fused head needs the label in the sequence)."""
    rows, width, prompt_width = checked_shapes(input_ids, attention_mask, logits_to_keep)
    device = input_ids.device
    real = attention_mask.bool()
    prompt_lengths, lengths = real[:, :prompt_width].sum(1), real[:, prompt_width:].sum(1)
    columns = torch.arange(width, device=device)
    expected = (columns >= prompt_width - prompt_lengths[:, None]) & (columns < prompt_width + lengths[:, None])
    if not torch.equal(real, expected) or bool(((prompt_lengths == 0) & (lengths > 0)).any()):
        raise ValueError("rows are not TRL's layout (a left-padded prompt of at least one token, then a right-padded "
                         "completion)")
    if groups is None:
        groups = prompt_groups(input_ids, attention_mask, logits_to_keep)
    elif groups.shape != (rows,):
        raise ValueError(f"groups must hold one group index per row ({rows}), got shape {tuple(groups.shape)}")
    key = input_ids[:, :prompt_width].masked_fill(~real[:, :prompt_width], -1)
    members: dict[int, list[int]] = {}
    for row, group in enumerate(groups.tolist()):
        members.setdefault(group, []).append(row)
    firsts = torch.tensor([members[g][0] for g in groups.tolist()], device=device)
    if not torch.equal(key[firsts], key):
        raise ValueError("rows of one group have different prompts: pass groups=None to find them from the prompts")

    prompt_lengths, lengths = prompt_lengths.tolist(), lengths.tolist()
    ids, positions, tree_of, branch_of = [], [], [], []
    predictors, score_rows, score_columns = [], [], []
    size = branch = 0

    def add(tokens: torch.Tensor, start: int, tree: int, owner: int) -> None:
        nonlocal size
        ids.append(tokens)
        positions.append(torch.arange(start, start + len(tokens), device=device))
        tree_of.append(torch.full((len(tokens),), tree, device=device))
        branch_of.append(torch.full((len(tokens),), owner, device=device))
        size += len(tokens)

    for tree, members_ in enumerate(members.values()):
        members_ = [row for row in members_ if lengths[row] > 0]
        if not members_:
            continue
        length = prompt_lengths[members_[0]]
        prompt = input_ids[members_[0], prompt_width - length:prompt_width]
        add(prompt[:-1], prompt_width - length, tree, -1)  # the shared trunk: -1 is seen by every branch
        for row in members_:
            n = lengths[row]
            predictors.append(torch.arange(size, size + n, device=device))
            score_rows.append(torch.full((n,), row, device=device))
            score_columns.append(torch.arange(n, device=device))
            end = prompt_width + (n if keep_last else n - 1)
            add(torch.cat([prompt[-1:], input_ids[row, prompt_width:end]]), prompt_width - 1, tree, branch)
            branch += 1
    if not predictors:
        return None
    tree_of, branch_of = torch.cat(tree_of), torch.cat(branch_of)
    index = torch.arange(size, device=device)
    allowed = ((tree_of[:, None] == tree_of[None, :]) & (index[None, :] <= index[:, None])
               & ((branch_of[None, :] == -1) | (branch_of[:, None] == branch_of[None, :])))
    return _Tree(torch.cat(ids)[None], torch.cat(positions)[None], allowed, torch.cat(predictors),
                 torch.cat(score_rows), torch.cat(score_columns))


def shared_prompt_logps_and_entropies(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    groups: torch.Tensor | None = None,
    token_chunk: int = 512,
    fused_lm_head: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies) of the completion tokens, as TRL's `_get_per_token_logps_and_entropies`
    returns them: `(B, logits_to_keep)`, stock's values at every real completion position, 0 elsewhere, gradients as
    stock's. Each group's prompt runs once (see the module docstring).

    Args:
        model: the policy as the trainer calls it (a DDP/DeepSpeed wrapper is fine: one call through its forward).
            Check `shared_prompt_unsupported(model)` first.
        input_ids, attention_mask: `(B, S)` in TRL's layout, left-padded prompt + right-padded completion. Positions
            are the columns of this input: keep stock's prompt columns to get stock's numbers exactly.
        logits_to_keep: the completion width (the last `logits_to_keep` columns).
        temperature: logits are divided by it, as TRL does (ignored with `fused_lm_head`: TRL's patch applies its own).
        compute_entropy: also return the entropy of each position's next-token distribution.
        groups: `(B,)` group index per row (rows of one group must have identical prompts); None finds the groups
            from the prompts (`prompt_groups`).
        token_chunk: rows of logits per log-softmax chunk (memory: `token_chunk x vocab` floats at a time).
        fused_lm_head: score through TRL's fused LM head (`model(..., labels=..., fused_lm_head=True)`, patched onto
            the policy by GRPOTrainer/RLOOTrainer): no logits, TRL's own kernel's numbers.

    Call it where stock's call runs (inside `accelerator.autocast()` under mixed precision). Returns log-probs in at
    least float32 (float64 for a float64 model) and the entropies or None.
    """
    if token_chunk < 1:
        raise ValueError(f"token_chunk must be >= 1, got {token_chunk}")
    tree = _tree(input_ids, attention_mask, logits_to_keep, groups, keep_last=fused_lm_head)
    if tree is None:  # no completion token: packing keeps the (zero) result connected to the model
        return packed_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, temperature,
                                          compute_entropy, token_chunk, fused_lm_head)
    inner = _unwrap(model)
    impl = getattr(_text_config(inner), "_attn_implementation", None)
    if impl == "sdpa":
        mask = tree.allowed
    else:  # eager adds the mask to the scores
        dtype = inner.dtype
        mask = torch.zeros(tree.allowed.shape, dtype=dtype, device=input_ids.device)
        mask = mask.masked_fill(~tree.allowed, torch.finfo(dtype).min)
    kwargs = {"input_ids": tree.input_ids, "position_ids": tree.position_ids, "attention_mask": mask[None, None],
              "use_cache": False}
    labels = input_ids[tree.rows, input_ids.shape[1] - int(logits_to_keep) + tree.columns]
    logps, entropy = score_sequence(model, kwargs, tree.predictors, labels, temperature, compute_entropy,
                                    token_chunk, fused_lm_head)
    shape = (input_ids.shape[0], int(logits_to_keep))

    def scatter(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(shape).index_put((tree.rows, tree.columns), values)

    return scatter(logps), (scatter(entropy) if entropy is not None else None)


def shared_prompt_unsupported(model: torch.nn.Module, probe: bool = True) -> str | None:
    """None when `shared_prompt_logps_and_entropies` gives this model's stock numbers, else a one-line reason for a
    user-facing note: the model must pack (`packing.packing_unsupported`: a decoder-only text model, no state carried
    along the sequence, `logits_to_keep`; `probe` runs its two tiny forwards) and its attention must take a dense 4D
    mask as given (sdpa or eager)."""
    impl = getattr(_text_config(_unwrap(model)), "_attn_implementation", None)
    if impl not in TREE_MASK_IMPLEMENTATIONS:
        return (f"attn_implementation={impl!r} takes no dense 4D mask, which shared prompts attend through: load the "
                "model with attn_implementation='sdpa' (or 'eager'), or use the `packed` strategy")
    return packing_unsupported(model, probe=probe)


def plan_shared_prompt(groups: Sequence[int], prompt_lengths: Sequence[int], completion_lengths: Sequence[int],
                       token_budget: int, min_microbatches: int = 1) -> list[list[int]]:
    """Cut one optimizer step's rows into micro-batches of at most `token_budget` shared-prompt tokens, each group's
    prompt counted once per micro-batch it appears in (a micro-batch costs, per group in it, its prompt length plus
    its rows' completion lengths). Groups go whole, largest first, into the least loaded micro-batch (a new one when
    it does not fit there); a group over the budget is split, each part paying its prompt. At least
    `min_microbatches` micro-batches (when there are that many rows; more if the budget needs them), none empty; only
    a micro-batch holding a single row whose prompt plus completion exceeds the budget may exceed it. Returns row
    indices per micro-batch."""
    count = len(groups)
    if not len(prompt_lengths) == len(completion_lengths) == count:
        raise ValueError(f"groups, prompt_lengths and completion_lengths must be alike, got {count}, "
                         f"{len(prompt_lengths)} and {len(completion_lengths)}")
    if token_budget < 1 or min_microbatches < 1:
        raise ValueError(f"token_budget and min_microbatches must be >= 1, got {token_budget} and {min_microbatches}")
    members: dict[int, list[int]] = {}
    for row, group in enumerate(groups):
        members.setdefault(group, []).append(row)
    for rows in members.values():
        if len({prompt_lengths[row] for row in rows}) > 1:
            raise ValueError(f"rows {rows} share a group but not a prompt length")

    def cost(rows: Sequence[int]) -> int:
        by_group = {groups[row]: prompt_lengths[row] for row in rows}
        return sum(by_group.values()) + sum(completion_lengths[row] for row in rows)

    total = sum(cost(rows) for rows in members.values())
    bins: list[list[int]] = [[] for _ in range(min(count, max(min_microbatches, math.ceil(total / token_budget))))]
    loads = [0] * len(bins)
    for rows in sorted(members.values(), key=cost, reverse=True):
        if cost(rows) <= token_budget:  # whole: the least loaded micro-batch, or a new one
            target = min(range(len(bins)), key=loads.__getitem__)
            if loads[target] + cost(rows) > token_budget:
                bins.append([])
                loads.append(0)
                target = len(bins) - 1
            bins[target] += rows
            loads[target] += cost(rows)
            continue
        prompt = prompt_lengths[rows[0]]
        for row in sorted(rows, key=lambda r: completion_lengths[r], reverse=True):  # split: a part per bin
            holds = [any(groups[r] == groups[row] for r in rows_) for rows_ in bins]
            fits = [b for b in range(len(bins))
                    if loads[b] + completion_lengths[row] + (0 if holds[b] else prompt) <= token_budget]
            if not fits:  # alone: an empty micro-batch, or a new one
                fits = [next((b for b in range(len(bins)) if not bins[b]), len(bins))]
                if fits[0] == len(bins):
                    bins.append([])
                    loads.append(0)
                    holds.append(False)
            target = min(fits, key=lambda b: (not holds[b], loads[b]))  # its group's part first, then least loaded
            bins[target].append(row)
            loads[target] = cost(bins[target])
    while any(not rows for rows in bins):  # fewer groups than micro-batches: split the largest micro-batch
        empty = next(b for b, rows in enumerate(bins) if not rows)
        largest = max(range(len(bins)), key=lambda b: (len(bins[b]) > 1, loads[b]))
        if len(bins[largest]) < 2:
            break
        rows = sorted(bins[largest], key=lambda r: (groups[r], r))
        bins[largest], bins[empty] = rows[:len(rows) // 2], rows[len(rows) // 2:]
        loads[largest], loads[empty] = cost(bins[largest]), cost(bins[empty])
    return [sorted(rows) for rows in bins if rows]


@dataclass(frozen=True)
class SharedPrompt(Strategy):
    """Each optimizer step's rows of one prompt kept in one micro-batch where they fit (`plan_shared_prompt` over
    the step's micro-batches, balanced by shared-prompt tokens; rows stay on their rank), and each micro-batch's
    loss forward run as prompt trees, in parts of at most `dense_max_tokens` tokens (the tree mask is dense)."""

    regroups: bool = True
    uneven: bool = True
    trims: bool = True

    def unsupported(self, model: torch.nn.Module) -> str | None:
        return shared_prompt_unsupported(model)

    def plan(self, rows: PassRows) -> TrainingPlan:
        order: list[int] = []
        sizes: list[int] = []
        for step in range(max(rows.steps, default=-1) + 1):
            ids = [i for i, s in enumerate(rows.steps) if s == step]
            costs = [[rows.groups[i] for i in ids], [rows.prompt_lengths[i] for i in ids],
                     [rows.completion_lengths[i] for i in ids]]
            bins = plan_shared_prompt(*costs, token_budget=sum(costs[1]) + sum(costs[2]) + 1,
                                      min_microbatches=rows.microbatches_per_step)
            order += [ids[i] for part in bins for i in part]
            sizes += [len(part) for part in bins]
        return TrainingPlan(order, 0, sizes, 0, False)

    def layout(self, batch: dict, dense_max_tokens: int | None) -> Layout:
        prompt, completion = batch["prompt_mask"].sum(1).tolist(), batch["completion_mask"].sum(1).tolist()
        groups = prompt_groups(batch["prompt_ids"], batch["prompt_mask"], 0).tolist()
        budget = dense_max_tokens or sum(prompt) + sum(completion) + 1
        parts = plan_shared_prompt(groups, prompt, completion, budget)
        tokens = sum(sum({groups[r]: prompt[r] for r in part}.values()) + sum(completion[r] for r in part)
                     for part in parts)
        return Layout("shared_prompt", tuple(tuple(part) for part in parts), tokens, tree_forward)


def tree_forward(model, input_ids, attention_mask, logits_to_keep, temperature, compute_entropy):
    """`shared_prompt_logps_and_entropies` through TRL's fused LM head (stock's numbers, no logits)."""
    return shared_prompt_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, temperature,
                                             compute_entropy, fused_lm_head=True)
