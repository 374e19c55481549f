"""The length head: K log-spaced bins, soft labels exp(-|j-i|), loss λ·CE + (1-λ)·MSE, median-bin readout."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .context import ESTIMATES
from .features import feature_size

VALUE_MEMORY = 1024  # examples per bin that its read-out value averages over, so the value follows drifting lengths
CONFIG_NAME = "predictor_config.json"
WEIGHTS_NAME = "predictor.safetensors"


@dataclass
class HeadConfig:
    """Shape and loss of a `PLPHead`; saved beside its weights."""

    hidden_size: int
    max_length: int
    num_bins: int = 20
    ce_weight: float = 0.95
    dropout: float = 0.1
    pooling: str = "egtp"
    feature_layer: int = -1
    context_size: int = 0  # context features after the PLP features (`predictor.context`); 0: none
    extra_features: int = 0  # inputs between the PLP features and the context (feature variants benchmarked offline)


def bin_edges(num_bins: int, max_length: int) -> torch.Tensor:
    """num_bins + 1 edges: 0, then log-spaced from 4 to max_length + 1 (a length of exactly max_length fits)."""
    top = math.log10(max_length + 1)
    return torch.cat([torch.zeros(1), torch.logspace(min(math.log10(4.0), top / 2), top, num_bins)])


def bin_centers(edges: torch.Tensor) -> torch.Tensor:
    """Geometric mid-points of the bins (the first bin, starting at 0, uses its arithmetic mid-point)."""
    centers = (edges[:-1] * edges[1:]).sqrt()
    centers[0] = edges[1] / 2
    return centers


def bin_index(lengths: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The bin holding each length (lengths past the last edge go to the last bin)."""
    return (torch.bucketize(lengths.float(), edges[1:-1].to(lengths.device), right=True)).long()


def soft_labels(index: torch.Tensor, num_bins: int) -> torch.Tensor:
    """p_j ∝ exp(-|j - i|) for true bin i: (N,) -> (N, K), rows sum to 1 and peak at i."""
    j = torch.arange(num_bins, device=index.device)
    return torch.softmax(-(j.unsqueeze(0) - index.unsqueeze(1)).abs().float(), dim=1)


class PLPHead(nn.Module):
    """`Linear(F, d/2) → LayerNorm → ReLU → Dropout → Linear(d/2, K)` over PLP features, as in the paper. With
    context features, a learned prior adds each estimate's soft label, -|j - bin(estimate)|, weighted per estimate,
    to the bin logits: the head can copy the best estimate and learn what the hidden states add to it. The prior
    starts silent (weights 0): an untrained head reads the hidden states, so its first predictions already differ
    between prompts (starting it at the estimates, all equal to naive in round 1, made every prediction alike)."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        width = max(config.hidden_size // 2, 16)
        self.net = nn.Sequential(
            nn.Linear(feature_size(config.hidden_size) + config.extra_features + config.context_size, width),
            nn.LayerNorm(width),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(width, config.num_bins),
        )
        edges = bin_edges(config.num_bins, config.max_length)
        self.register_buffer("edges", edges, persistent=False)
        self.register_buffer("centers", bin_centers(edges), persistent=False)
        self.register_buffer("bin_values", bin_centers(edges))  # mean remaining length of the examples in each bin
        self.register_buffer("bin_counts", torch.zeros(config.num_bins))
        if config.context_size:
            self.prior_weight = nn.Parameter(torch.zeros(len(ESTIMATES)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Bin logits (N, K)."""
        logits = self.net(features.to(self.net[0].weight.dtype))
        return logits + self.prior(features[:, -self.config.context_size :]) if self.config.context_size else logits

    def prior(self, context: torch.Tensor) -> torch.Tensor:
        """Σ_e w_e · -|j - bin(estimate_e)|: (N, K) logits from the estimates leading each context vector."""
        remaining = context[:, : len(ESTIMATES)].float() * self.config.max_length
        index = bin_index(remaining, self.edges)  # (N, E)
        closeness = -(torch.arange(self.config.num_bins, device=index.device) - index.unsqueeze(-1)).abs().float()
        return (self.prior_weight.unsqueeze(-1) * closeness).sum(1).to(self.net[0].weight.dtype)

    def expected_length(self, logits: torch.Tensor) -> torch.Tensor:
        """Expected remaining length Σ_j p̂_j · center_j, in tokens: the loss's regression term."""
        return torch.softmax(logits.float(), dim=-1) @ self.centers

    def readout(self, probs: torch.Tensor) -> torch.Tensor:
        """The bin holding the median of p̂ (the point that minimises expected absolute error), read as the mean
        length of the training examples that fell in it. Unlike Σ_j p̂_j · center_j, it is not pulled inwards by
        the soft labels' spread, and a bin full of capped completions reads out the cap."""
        below = probs.cumsum(-1) - probs  # probability mass strictly below each bin
        value = self.bin_values[((below < 0.5).sum(-1) - 1).clamp(min=0)]
        return torch.where(probs.isfinite().all(-1), value, float("nan"))  # a diverged head must show as NaN

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted remaining length (N,) in tokens, eval mode."""
        was_training = self.training
        self.eval()
        out = self.readout(torch.softmax(self(features).float(), dim=-1))
        self.train(was_training)
        return out

    @torch.no_grad()
    def observe(self, index: torch.Tensor, remaining: torch.Tensor) -> None:
        """Fold examples into each bin's read-out value (a running mean over the last ~VALUE_MEMORY per bin)."""
        k = self.config.num_bins
        n = torch.bincount(index, minlength=k).to(self.bin_values)
        total = torch.bincount(index, weights=remaining.float(), minlength=k).to(self.bin_values)
        counts = self.bin_counts + n
        self.bin_values += torch.where(n > 0, (total - n * self.bin_values) / counts.clamp(min=1), 0.0)
        self.bin_counts.copy_(counts.clamp(max=VALUE_MEMORY))

    def loss(self, features: torch.Tensor, remaining: torch.Tensor) -> torch.Tensor:
        """λ·CE(soft labels, p̂) + (1-λ)·MSE on lengths scaled by max_length; in training mode it also updates the
        bins' read-out values."""
        logits = self(features)
        index = bin_index(remaining, self.edges)
        if self.training:
            self.observe(index, remaining)
        target = soft_labels(index, self.config.num_bins)
        ce = -(target * torch.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
        scale = float(self.config.max_length)
        mse = F.mse_loss(self.expected_length(logits) / scale, remaining.float() / scale)
        return self.config.ce_weight * ce + (1.0 - self.config.ce_weight) * mse

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `predictor_config.json` and `predictor.safetensors` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, directory / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "PLPHead":
        """Load a head saved by `save_pretrained` (`engine.check_head` checks it against a run's settings)."""
        head = cls(read_head_config(directory))
        head.load_state_dict(load_file(Path(directory) / WEIGHTS_NAME))
        return head


def read_head_config(directory: str | Path) -> HeadConfig:
    """The `HeadConfig` of a head saved in `directory` (only its JSON is read: cheap enough to check a run's
    settings before any model loads)."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        inside = directory / "lenbalance"  # a trainer checkpoint keeps its predictor in this subfolder
        hint = (f" It looks like a trainer checkpoint: point it at {inside} instead."
                if (inside / CONFIG_NAME).is_file()
                else " Point it at a folder written by `PLPHead.save_pretrained` (e.g. checkpoint-N/lenbalance).")
        raise FileNotFoundError(f"No saved predictor in {directory} (no {CONFIG_NAME}).{hint}")
    return HeadConfig(**json.loads((directory / CONFIG_NAME).read_text()))
