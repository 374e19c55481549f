"""Features the length head reads: next-token entropy, prompt pooling (EGTP and ablations), and the
streaming aggregate of generated tokens used by Progressive Length Prediction (PLP)."""

from __future__ import annotations

import math

import torch

POOLING_METHODS = ("egtp", "mean", "max", "last", "first4")


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) over the last dim, in float32; -inf logits count as p=0 (0·log 0 = 0)."""
    return torch.special.entr(torch.softmax(logits.float(), dim=-1)).sum(-1)  # entr(0) = 0: three kernels


def pool_tokens(hidden: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, method: str = "egtp") -> torch.Tensor:
    """Pool `hidden` (B, T, H) over the positions where `mask` (B, T) is true.

    `egtp` weights token i by softmax(entropy)_i (the paper's Entropy-Guided Token Pooling); `mean`, `max`,
    `last` (last real token) and `first4` (mean of the first four real tokens) are the ablations.
    """
    if method not in POOLING_METHODS:
        raise ValueError(f"Unknown pooling method {method!r}; valid: {', '.join(POOLING_METHODS)}.")
    hidden = hidden.float()
    mask = mask.bool()
    if method == "egtp":
        weights = torch.softmax(entropy.float().masked_fill(~mask, -math.inf), dim=-1)
        return torch.einsum("bt,bth->bh", weights.nan_to_num(0.0), hidden)
    if method == "max":
        return hidden.masked_fill(~mask.unsqueeze(-1), -math.inf).amax(1).nan_to_num(0.0, neginf=0.0)
    if method == "last":
        last = mask.size(1) - 1 - mask.flip(1).int().argmax(1)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    if method == "first4":
        mask = mask & (mask.int().cumsum(1) <= 4)
    weights = mask.float() / mask.float().sum(1, keepdim=True).clamp(min=1.0)
    return torch.einsum("bt,bth->bh", weights, hidden)


class StreamingPool:
    """Entropy-softmax-weighted mean of a stream of hidden states, O(1) memory per sequence.

    Keeps the running maximum entropy `m`, `s = Σ exp(H_j - m)` and `v = Σ exp(H_j - m) h_j` (online softmax),
    so `value()` equals `pool_tokens(..., "egtp")` over the tokens seen so far.
    """

    def __init__(self, batch_size: int, hidden_size: int, device: torch.device | str = "cpu") -> None:
        self.max = torch.full((batch_size,), -math.inf, device=device)
        self.norm = torch.zeros(batch_size, device=device)
        self.sum = torch.zeros(batch_size, hidden_size, device=device)
        self.last = torch.zeros(batch_size, hidden_size, device=device)

    def update(self, hidden: torch.Tensor, entropy: torch.Tensor) -> None:
        """Add one token per sequence: `hidden` (B, H), `entropy` (B,)."""
        self.extend(hidden.unsqueeze(1), entropy.unsqueeze(1))

    def extend(self, hidden: torch.Tensor, entropy: torch.Tensor) -> None:
        """Add T tokens per sequence at once: `hidden` (B, T, H), `entropy` (B, T); equals T calls of `update`."""
        hidden, entropy = hidden.float(), entropy.float()
        new_max = torch.maximum(self.max, entropy.amax(1))
        scale = torch.exp(self.max - new_max)  # exp(-inf) = 0 on the first token
        weight = torch.exp(entropy - new_max.unsqueeze(1))
        self.norm = self.norm * scale + weight.sum(1)
        self.sum = self.sum * scale.unsqueeze(1) + torch.einsum("bt,bth->bh", weight, hidden)
        self.max = new_max
        self.last = hidden[:, -1]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these sequences (a generate loop dropped the others)."""
        self.max, self.norm, self.sum, self.last = self.max[rows], self.norm[rows], self.sum[rows], self.last[rows]

    def take(self, rows: torch.Tensor, device: torch.device | str = "cpu") -> StreamingPool:
        """A new pool holding only these sequences, on `device` (this one is unchanged)."""
        out = StreamingPool(0, self.sum.size(1), device=device)
        out.max, out.norm, out.sum, out.last = (getattr(self, name)[rows.to(self.sum.device)].to(device)
                                                for name in ("max", "norm", "sum", "last"))
        return out

    @classmethod
    def cat(cls, pools: list[StreamingPool], device: torch.device | str = "cpu") -> StreamingPool:
        """One pool holding the sequences of `pools`, in order, on `device` (rows regrouped between generate calls)."""
        out = cls(0, pools[0].sum.size(1), device=device)
        for name in ("max", "norm", "sum", "last"):
            setattr(out, name, torch.cat([getattr(pool, name).to(device) for pool in pools]))
        return out

    def value(self) -> torch.Tensor:
        """(B, H) pooled state; zeros before the first token."""
        return self.sum / self.norm.clamp(min=1e-30).unsqueeze(1)


def plp_features(
    prompt_feature: torch.Tensor, generated: StreamingPool | None, steps: int, max_length: int
) -> torch.Tensor:
    """z_t = [h_prompt, pool(h'_1..h'_t), h'_t, log1p(t)/log1p(max), t/max]: shape (B, 3H + 2)."""
    batch, hidden = prompt_feature.shape
    if generated is None:
        pooled = last = prompt_feature.new_zeros(batch, hidden)
    else:
        pooled, last = generated.value(), generated.last
    t = prompt_feature.new_full((batch, 1), float(steps))
    time_features = torch.cat([torch.log1p(t) / math.log1p(max_length), t / max_length], dim=1)
    return torch.cat([prompt_feature.float(), pooled, last, time_features], dim=1)


def feature_size(hidden_size: int) -> int:
    """Width of `plp_features` for a model of hidden size `hidden_size`."""
    return 3 * hidden_size + 2
