"""Scores: mean absolute error and Kendall's tau-b."""

from __future__ import annotations

import math

import torch


def mae(predicted: torch.Tensor, target: torch.Tensor) -> float:
    return (predicted.float() - target.float()).abs().mean().item()


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Kendall's tau-b (ties allowed); None when either side is constant or has < 2 items."""
    a, b = a.double().flatten(), b.double().flatten()
    upper = torch.triu_indices(len(a), len(a), offset=1)
    da = torch.sign(a.unsqueeze(1) - a.unsqueeze(0))[upper[0], upper[1]]
    db = torch.sign(b.unsqueeze(1) - b.unsqueeze(0))[upper[0], upper[1]]
    ties_free = (da != 0).sum().item() * (db != 0).sum().item()
    return (da * db).sum().item() / math.sqrt(ties_free) if ties_free else None
