"""The baselines' heads, each a small nn.Module with `loss(x, y)` and `predict(x)` (remaining length, tokens),
plus the running-mean baseline. PLP/EGTP use the product's own `PLPHead` unchanged."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rl_lenbalance.predictor import NaiveLengthBaseline


def mlp(width: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, out))


class Standardize(nn.Module):
    """x -> (x - mean) / std with statistics of the training features (set by `fit`)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    def fit(self, x: torch.Tensor) -> None:
        self.mean, self.std = x.mean(0), x.std(0).clamp(min=1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Regressor(nn.Module):
    """SSJF-Reg: MLP -> one value, MSE on lengths scaled by the cap."""

    def __init__(self, width: int, max_length: int, hidden: int = 128) -> None:
        super().__init__()
        self.norm, self.net, self.scale = Standardize(width), mlp(width, hidden, 1), float(max_length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x)).squeeze(-1)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self(x), y / self.scale)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return (self(x) * self.scale).clamp(min=0)


class BucketClassifier(nn.Module):
    """MLP over length buckets with hard-label cross-entropy; reads out the expected bucket value (TRAIL) or the
    argmax bucket's value (SSJF-MC, S3). A bucket's value is the mean training length in it (its mid-point if empty)."""

    def __init__(self, width: int, edges: torch.Tensor, readout: str, hidden: int = 128) -> None:
        super().__init__()
        self.norm, self.net = Standardize(width), mlp(width, hidden, len(edges) - 1)
        self.register_buffer("edges", edges.float())
        self.register_buffer("values", (edges[1:] + edges[:-1]).float() / 2)
        self.readout = readout

    def bucket(self, y: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(y.float(), self.edges[1:-1], right=True)

    def calibrate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        index = self.bucket(y)
        for k in index.unique():
            self.values[k] = y[index == k].float().mean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(x), self.bucket(y))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        logits = self(x)
        if self.readout == "expected":
            return torch.softmax(logits, -1) @ self.values
        return self.values[logits.argmax(-1)]


class Ranker(nn.Module):
    """LTR: an MLP score trained with a pairwise logistic ranking loss; scores become lengths by quantile mapping
    onto the training lengths (only the order is learned)."""

    def __init__(self, width: int, hidden: int = 128) -> None:
        super().__init__()
        self.norm, self.net = Standardize(width), mlp(width, hidden, 1)
        self.register_buffer("train_scores", torch.zeros(1))
        self.register_buffer("train_lengths", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x)).squeeze(-1)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self(x)
        order = torch.sign(y.unsqueeze(1) - y.unsqueeze(0))
        pairs = order != 0
        if not pairs.any():
            return s.sum() * 0
        return F.softplus(-(s.unsqueeze(1) - s.unsqueeze(0)) * order)[pairs].mean()

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        was = self.training
        self.eval()
        self.train_scores, self.train_lengths = self(x).sort().values, y.float().sort().values
        self.train(was)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        rank = torch.searchsorted(self.train_scores, self(x)).clamp(max=len(self.train_scores) - 1)
        return self.train_lengths[rank]


class RunningMean:
    """The naive baseline of the online engine: mean remaining length of the training completions alive at t."""

    def __init__(self) -> None:
        self.baseline = NaiveLengthBaseline(history=1 << 30)

    def fit_lengths(self, lengths: torch.Tensor) -> None:
        self.baseline.update(lengths.tolist())

    def predict_at(self, steps: torch.Tensor) -> torch.Tensor:
        cache = {int(t): self.baseline.predict_remaining(int(t)) for t in steps.unique()}
        return torch.tensor([cache[int(t)] or 0.0 for t in steps])
