"""Scores: mean absolute error and Kendall's tau-b."""

from __future__ import annotations

import math

import torch


def mae(predicted: torch.Tensor, target: torch.Tensor) -> float:
    return (predicted.float() - target.float()).abs().mean().item()


def mae_standard_error(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Standard error of the MAE over the scored items (how much the test sample alone moves it)."""
    errors = (predicted.float() - target.float()).abs()
    return (errors.std() / math.sqrt(len(errors))).item() if len(errors) > 1 else float("nan")


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Kendall's tau-b (ties allowed); None when either side is constant or has < 2 items."""
    a, b = a.double().flatten(), b.double().flatten()
    upper = torch.triu_indices(len(a), len(a), offset=1)
    da = torch.sign(a.unsqueeze(1) - a.unsqueeze(0))[upper[0], upper[1]]
    db = torch.sign(b.unsqueeze(1) - b.unsqueeze(0))[upper[0], upper[1]]
    ties_free = (da != 0).sum().item() * (db != 0).sum().item()
    return (da * db).sum().item() / math.sqrt(ties_free) if ties_free else None


def summary(predicted: torch.Tensor, target: torch.Tensor) -> dict:
    """MAE, its standard error, Kendall tau and the number of items."""
    return {"mae": mae(predicted, target), "mae_se": mae_standard_error(predicted, target),
            "kendall_tau": kendall_tau(predicted, target), "n": len(target)}
