"""Offline training (train split, best validation epoch kept) and scoring (test split) of one predictor."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .dataset import BenchData
from .metrics import mae, summary
from .models import RunningMean, Standardize
from .predictors import Pairs, PredictorSpec, make_pairs


@dataclass
class FitSettings:
    epochs: int = 80
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


def fit_head(head: nn.Module, train: Pairs, val: Pairs, settings: FitSettings) -> nn.Module:
    """AdamW on `head.loss`; keeps the weights of the epoch with the lowest validation MAE."""
    for module in head.modules():
        if isinstance(module, Standardize):
            module.fit(train.x)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=0.01)
    best, best_state = float("inf"), copy.deepcopy(head.state_dict())
    for _ in range(settings.epochs):
        head.train()
        for batch in torch.randperm(len(train.y)).split(settings.batch_size):
            loss = head.loss(train.x[batch], train.y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        head.eval()
        if hasattr(head, "calibrate"):
            head.calibrate(train.x, train.y)
        score = mae(head.predict(val.x), val.y)
        if score < best:
            best, best_state = score, copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    return head.eval()


def train_predictor(spec: PredictorSpec, data: BenchData, settings: FitSettings):
    """A trained predictor: an nn.Module head, or the running mean for the constant baseline."""
    train_rows = data.rows("train")
    if spec.head is None:
        baseline = RunningMean()
        baseline.fit_lengths(data.lengths[train_rows])
        return baseline
    train = make_pairs(data, spec.features, train_rows, spec.train_steps)
    val = make_pairs(data, spec.features, data.rows("val"), spec.train_steps)
    torch.manual_seed(settings.seed)  # the initial weights and batches depend on the seed only, not on what ran before
    return fit_head(spec.head(data, train.x.size(1)), train, val, settings)


def predict(model, pairs: Pairs) -> torch.Tensor:
    if isinstance(model, RunningMean):
        return model.predict_at(pairs.t)
    return model.predict(pairs.x).float()


def score(spec: PredictorSpec, model, data: BenchData, split: str = "test") -> dict[int, dict]:
    """Per scored step t: MAE of the remaining length (and its standard error) and Kendall tau over the completions
    alive at t."""
    pairs = make_pairs(data, spec.features, data.rows(split), spec.eval_steps)
    out = {}
    for t in spec.eval_steps:
        at = pairs.at(t)
        if len(at.y):
            predicted = predict(model, at)
            out[t] = summary(predicted, at.y)
    return out
