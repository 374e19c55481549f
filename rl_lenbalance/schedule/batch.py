"""Row selection and padding trimming of a TRL batch (a dict of tensors, rows first)."""

from __future__ import annotations

import torch


def take_rows(batch: dict, rows: list[int]) -> dict:
    """The batch with only `rows`, in that order: tensors with a row dimension and lists are indexed, other values
    (scalars, None) kept, as TRL's `shuffle_sequence_dict` treats them."""
    index = torch.tensor(rows, dtype=torch.long)

    def take(value):
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value[index.to(value.device)]
        return [value[i] for i in rows] if isinstance(value, list) else value

    return {key: take(value) for key, value in batch.items()}


def trim_padding(batch: dict, prompt: bool = True) -> dict:
    """Drop prompt columns that are padding in every row (left; only with `prompt`) and completion columns likewise
    (right). `prompt_*` tensors are cut by `prompt_mask`, every other 2-D tensor of the completions' width by
    `completion_mask`. At least one completion column stays (TRL slices logits with `[:, -width:]`)."""
    prompt_keep = batch["prompt_mask"].any(0).nonzero()
    completion_keep = batch["completion_mask"].any(0).nonzero()
    p0 = (int(prompt_keep[0]) if len(prompt_keep) else batch["prompt_mask"].size(1)) if prompt else 0
    c1 = int(completion_keep[-1]) + 1 if len(completion_keep) else 1
    width = batch["completion_ids"].size(1)
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim > 1 and key.startswith("prompt"):
            value = value[:, p0:]
        elif isinstance(value, torch.Tensor) and value.ndim > 1 and value.size(1) == width:
            value = value[:, :c1]
        out[key] = value
    return out


def fit_columns(values: torch.Tensor, width: int) -> torch.Tensor:
    """`values` (rows, columns) cut on the right to `width` columns, or padded there with zeros."""
    if values.size(1) >= width:
        return values[:, :width]
    return torch.nn.functional.pad(values, (0, width - values.size(1)))
