"""Recipe YAMLs: trainer settings at the top level (a `GRPOConfig`), plus `model:`, `task:` and `lenbalance:`."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from .config import LenBalanceConfig


@dataclass
class ModelArguments:
    """The `model:` section."""

    name_or_path: str = field(
        default="embedded:smollm2-135m-instruct",
        metadata={"help": "A local folder, a hub id (needs a reachable hub), or the embedded SmolLM2 (the default)."},
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16 or float16."})


@dataclass
class TaskArguments:
    """The `task:` section: the built-in arithmetic task."""

    num_prompts: int = field(default=64, metadata={"help": "How many problems to generate."})
    seed: int = field(default=0, metadata={"help": "Seed of the generated problems."})


@dataclass
class Recipe:
    training: object  # a GRPOConfig
    model: ModelArguments
    task: TaskArguments
    lenbalance: LenBalanceConfig


def _parse(section: str, cls, values: dict):
    valid = [f.name for f in fields(cls) if f.init]
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Unknown key {key!r} in the recipe's {section} section.{hint}")
    (parsed,) = HfArgumentParser(cls).parse_dict(values)
    return parsed


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    """Read a recipe YAML (with `overrides` merged into its top level) into validated dataclasses."""
    from trl import GRPOConfig

    values = yaml.safe_load(Path(path).read_text()) or {}
    for key, value in (overrides or {}).items():  # a section's overrides update that section, key by key
        values[key] = (values.get(key) or {}) | value if isinstance(value, dict) else value
    model = _parse("model", ModelArguments, values.pop("model", None) or {})
    task = _parse("task", TaskArguments, values.pop("task", None) or {})
    lenbalance = _parse("lenbalance", LenBalanceConfig, values.pop("lenbalance", None) or {})
    training = _parse("top-level (GRPOConfig)", GRPOConfig, values)
    return Recipe(training, model, task, lenbalance)
