"""The predictors of the benchmark: which features each reads, at which observed-token steps it is trained and
scored, and the head it trains. Add one by adding a `PredictorSpec` to `PREDICTORS`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from rl_lenbalance.predictor import HeadConfig, PLPHead, plp_features

from .dataset import STEPS, BenchData
from .models import BucketClassifier, Ranker, Regressor

Features = Callable[[BenchData, torch.Tensor, int], torch.Tensor]  # (data, completion rows, t) -> (n, F)


@dataclass(frozen=True)
class PredictorSpec:
    """A predictor: `features` of the rows alive at step t, a `head` factory (None: the running mean), the steps
    its training pairs come from, and the steps it is scored at (the remaining length after t observed tokens)."""

    name: str
    family: str
    description: str
    features: Features
    head: Callable[[BenchData, int], nn.Module] | None
    train_steps: tuple[int, ...] = (0,)
    eval_steps: tuple[int, ...] = (0,)


@dataclass
class Pairs:
    """(feature, remaining length) pairs: x (n, F), t (n,) observed tokens, y (n,) remaining, row (n,) completion."""

    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    row: torch.Tensor

    def at(self, step: int) -> "Pairs":
        keep = self.t == step
        return Pairs(self.x[keep], self.t[keep], self.y[keep], self.row[keep])


def make_pairs(data: BenchData, features: Features, rows: torch.Tensor, steps: tuple[int, ...]) -> Pairs:
    """Pairs for every completion in `rows` still generating after t tokens (length > t), for each t in `steps`."""
    parts = []
    for t in steps:
        alive = rows[data.lengths[rows] > t]
        parts.append((features(data, alive, t), torch.full((len(alive),), t), (data.lengths[alive] - t).float(), alive))
    x, t, y, row = (torch.cat(part) for part in zip(*parts))
    return Pairs(x.float(), t, y, row)


def pooled_prompt(method: str) -> Features:
    """The static PLP input z_0 with the prompt pooled by `method` (EGTP or an ablation)."""
    def features(data: BenchData, rows: torch.Tensor, t: int) -> torch.Tensor:
        return plp_features(data.pooled_by(method)[data.sample_prompt[rows]], None, 0, data.max_length)
    return features


def plp_stream(data: BenchData, rows: torch.Tensor, t: int) -> torch.Tensor:
    """z_t exactly as GenerationCapture produced it during generation."""
    return data.plp[rows, data.steps.index(t)].float()


def trail_embedding(data: BenchData, rows: torch.Tensor, t: int) -> torch.Tensor:
    return data.trail[rows, data.steps.index(t)].float()


def proxy_embedding(data: BenchData, rows: torch.Tensor, t: int) -> torch.Tensor:
    return data.proxy[data.sample_prompt[rows]].float()


def no_features(data: BenchData, rows: torch.Tensor, t: int) -> torch.Tensor:
    return torch.zeros(len(rows), 1)


def plp_head(data: BenchData, width: int) -> PLPHead:
    """The product's head with its default settings (K = 20 log-spaced bins, λ = 0.95)."""
    return PLPHead(HeadConfig(int(data.meta["hidden_size"]), data.max_length,
                              feature_layer=int(data.meta["feature_layer"])))


def equal_buckets(count: int) -> Callable[[BenchData, int], nn.Module]:
    def head(data: BenchData, width: int) -> BucketClassifier:
        return BucketClassifier(width, torch.linspace(0, data.max_length + 1, count + 1), readout="argmax")
    return head


def quantile_classes(count: int) -> Callable[[BenchData, int], nn.Module]:
    """Classes holding equal shares of the training lengths (edges from the train split)."""
    def head(data: BenchData, width: int) -> BucketClassifier:
        train = data.lengths[data.rows("train")].float()
        inner = torch.quantile(train, torch.linspace(0, 1, count + 1)[1:-1]).unique()
        edges = torch.cat([torch.zeros(1), inner, torch.tensor([data.max_length + 1.0])])
        return BucketClassifier(width, edges, readout="argmax")
    return head


def trail_head(data: BenchData, width: int) -> BucketClassifier:
    """TRAIL: MLP over 10 equal-width bins of the remaining length, expected value."""
    return BucketClassifier(width, torch.linspace(0, data.max_length + 1, 11), readout="expected", hidden=256)


PROMPT = "prompt only"
PROGRESSIVE = "progressive"
SPECS = [
    PredictorSpec("constant", "baseline", "running mean of the training lengths alive at t (the engine's naive "
                  "baseline)", no_features, None, STEPS, STEPS),
    PredictorSpec("ssjf-reg", PROMPT, "SSJF-Reg: proxy encoder (MiniLM) + MLP regression", proxy_embedding,
                  lambda data, width: Regressor(width, data.max_length)),
    PredictorSpec("ssjf-mc", PROMPT, "SSJF-MC: proxy encoder + MLP over 5 quantile classes", proxy_embedding,
                  quantile_classes(5)),
    PredictorSpec("s3", PROMPT, "S3: proxy encoder + bucket classifier over 10 equal-width buckets", proxy_embedding,
                  equal_buckets(10)),
    PredictorSpec("ltr", PROMPT, "LTR: proxy encoder + MLP score, pairwise ranking loss", proxy_embedding,
                  lambda data, width: Ranker(width)),
    PredictorSpec("trail", PROGRESSIVE, "TRAIL: intermediate-layer embedding (prompt mean, then the latest token) "
                  "+ MLP over bins, remaining length", trail_embedding, trail_head, STEPS, STEPS),
    PredictorSpec("egtp", PROMPT, "EGTP static: entropy-guided pooling of the prompt + PLP head",
                  pooled_prompt("egtp"), plp_head),
    *(PredictorSpec(f"pool-{m}", PROMPT, f"pooling ablation: {m} pooling + PLP head", pooled_prompt(m), plp_head)
      for m in ("mean", "max", "last", "first4")),
    PredictorSpec("plp", PROGRESSIVE, "PLP: EGTP prompt + streaming entropy-weighted pool of the generated tokens "
                  "+ last token, remaining length", plp_stream, plp_head, STEPS, STEPS),
]
PREDICTORS = {spec.name: spec for spec in SPECS}
