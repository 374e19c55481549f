"""One scenario's benchmark data: tokens, lengths and float16 features, saved as safetensors + JSON metadata."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rl_lenbalance.builtin.models import EMBEDDED_MODEL, default_cache_dir
from rl_lenbalance.predictor import POOLING_METHODS

FORMAT_VERSION = 1
TENSORS = ("prompt_split", "prompt_ids", "pooled", "proxy", "sample_prompt", "lengths", "completion_ids", "plp",
           "trail")

STEPS = (0, 8, 16, 32, 64)  # observed tokens at which progressive features are stored and PLP/TRAIL are scored
SPLITS = ("train", "val", "test")


@dataclass
class BenchData:
    """P prompts, N completions (a prompt has K of them in the RL scenario), S = len(STEPS) observed-token steps.

    prompt_split (P,) int8 index into SPLITS · prompt_ids (P, Tp) int32, -1 padded · pooled (P, len(POOLING_METHODS),
    H) float16 prompt features per pooling · proxy (P, D) float16 proxy-encoder embedding · sample_prompt (N,) ·
    lengths (N,) generated tokens incl. eos (capped) · completion_ids (N, max_new_tokens) int32, -1 padded ·
    plp (N, S, 3H + 2) float16 PLP features z_t as captured in generation · trail (N, S, H) float16 TRAIL input
    (intermediate layer: prompt mean at t = 0, the t-th generated token after). Features at t >= length are unused.
    """

    meta: dict
    prompts: list[str]
    prompt_split: torch.Tensor
    prompt_ids: torch.Tensor
    pooled: torch.Tensor
    proxy: torch.Tensor
    sample_prompt: torch.Tensor
    lengths: torch.Tensor
    completion_ids: torch.Tensor
    plp: torch.Tensor
    trail: torch.Tensor
    steps: tuple[int, ...] = field(default=STEPS)

    @property
    def max_length(self) -> int:
        return int(self.meta["max_new_tokens"])

    def rows(self, split: str) -> torch.Tensor:
        """Completion indices whose prompt belongs to `split`."""
        return torch.nonzero(self.prompt_split[self.sample_prompt] == SPLITS.index(split)).flatten()

    def pooled_by(self, method: str) -> torch.Tensor:
        """(P, H) prompt features pooled with `method`."""
        return self.pooled[:, POOLING_METHODS.index(method)].float()

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({name: getattr(self, name).contiguous() for name in TENSORS}, directory / "data.safetensors")
        body = {"meta": self.meta, "prompts": self.prompts, "steps": list(self.steps), "format": FORMAT_VERSION}
        (directory / "meta.json").write_text(json.dumps(body, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "BenchData":
        directory = Path(directory)
        if not (directory / "meta.json").is_file():
            raise FileNotFoundError(f"No benchmark data in {directory}; make it with `python -m benchmarks.forelen "
                                    "build`.")
        body = json.loads((directory / "meta.json").read_text())
        if body.get("format") != FORMAT_VERSION:
            raise ValueError(f"{directory} holds benchmark data of format {body.get('format')}, this code reads "
                             f"{FORMAT_VERSION}; rebuild it.")
        tensors = load_file(directory / "data.safetensors")
        return cls(meta=body["meta"], prompts=body["prompts"], steps=tuple(body["steps"]), **tensors)


def default_bench_dir(name: str = "full") -> Path:
    """`<rl_lenbalance cache>/bench/<name>` (the cache honours $RL_LENBALANCE_CACHE)."""
    return default_cache_dir() / "bench" / name


def scenario_dir(root: str | os.PathLike, scenario: str) -> Path:
    return Path(root) / scenario


def model_id(name: str | None) -> str:
    """What the metadata records as the model: the embedded model's name, a resolved folder, or a hub id."""
    if name is None or name == EMBEDDED_MODEL:
        return EMBEDDED_MODEL
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def check_compatible(meta: dict, model: str, feature_layer: int, hidden_size: int | None = None) -> None:
    """Refuse to score predictors for one model / feature layer / hidden size on data built with another."""
    wanted = {"model": model, "feature_layer": feature_layer}
    if hidden_size is not None:
        wanted["hidden_size"] = hidden_size
    wrong = {key: (value, meta.get(key)) for key, value in wanted.items() if meta.get(key) != value}
    if wrong:
        detail = "; ".join(f"{key}: predictor {want!r}, data set {have!r}" for key, (want, have) in wrong.items())
        raise ValueError(f"The benchmark data set was built for a different policy than the predictor ({detail}). "
                         "Rebuild the data with `bench build --model ... --feature-layer ...` to match, or score a "
                         "predictor made for the data set's model.")
