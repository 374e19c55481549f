"""Recipe YAMLs: trainer settings at the top level (a `GRPOConfig`), plus `model:`, `task:` and `lenbalance:`.

Every value is checked against its dataclass field's type before anything is loaded. Values are read as YAML 1.2
scalars: only true/false are booleans (`save_strategy: no` is the string 'no'), and `1e-6` is a number.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainingArguments

from ..config import LenBalanceConfig, cpu_has_fast_bf16

SECTIONS = ("model", "task", "lenbalance")


class RecipeError(ValueError):
    """A recipe (or a `--set` override) that cannot be used as written; the message says what to change."""


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (true/false only) and exponent floats without a dot (1e-6)."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                  list("-+0123456789."))
# the trainer's checkpointing switch: transformers renamed `gradient_checkpointing` to `activation_checkpointing`
# (5.25 has both, the old name warns; 5.17 only the old one). A recipe may use either name.
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in {f.name for f in fields(TrainingArguments)}
                 else "gradient_checkpointing")
_YAML11_BOOLS = {"yes": True, "on": True, "no": False, "off": False}  # accepted as booleans for boolean fields


def parse_yaml(text: str):
    """A YAML document or scalar as recipes read it."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class ModelArguments:
    """The `model:` section."""

    name_or_path: str = field(
        default="embedded:smollm2-135m-instruct",
        metadata={"help": "A local folder, a hub id (needs a reachable hub), or the embedded SmolLM2 (the default)."},
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16, float16 or auto."})

    def __post_init__(self) -> None:
        from ..builtin.models import _as_dtype

        try:
            _as_dtype(self.dtype)  # before anything is loaded
        except ValueError as error:
            raise RecipeError(f"model.dtype: {error}") from None


@dataclass
class TaskArguments:
    """The `task:` section: which built-in task (`rl_lenbalance.tasks.TASKS`), how many prompts, their seed."""

    name: str = field(
        default="arithmetic",
        metadata={"help": "The built-in task: 'arithmetic' (problems with an integer answer) or 'open_ended' (short "
                          "facts, open questions, lists, code, translation, long explanations)."},
    )
    num_prompts: int = field(
        default=64, metadata={"help": "How many prompts to generate (at least one generation batch's worth)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the generated prompts."})

    def __post_init__(self) -> None:
        from ..builtin.tasks import TASKS

        if self.name not in TASKS:
            close = difflib.get_close_matches(self.name, list(TASKS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"task.name={self.name!r} is not a built-in task.{hint} Use one of "
                              f"{', '.join(TASKS)}.")


@dataclass
class Recipe:
    training: object  # a GRPOConfig
    model: ModelArguments
    task: TaskArguments
    lenbalance: LenBalanceConfig
    resume_from_checkpoint: bool | str | None = None  # True: the last checkpoint in output_dir; a str: that one


def _union_members(hint) -> tuple:
    """The members of a union; an `Enum | str` field takes the enum's values only (the dataclass converts them)."""
    args = typing.get_args(hint)
    if str in args and any(isinstance(arg, type) and issubclass(arg, Enum) for arg in args):
        return tuple(arg for arg in args if arg is not str)
    return args


def _accepts(hint, value) -> bool:
    """Whether `value` (as YAML gives it) fits the type annotation `hint` (unions, Optional, Literal, enums, lists)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in _union_members(hint))
    if origin is typing.Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if hint is typing.Any or hint is object:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return isinstance(value, hint) or value in {member.value for member in hint}
    if origin in (list, tuple, set):
        item = args[0] if args else typing.Any
        return isinstance(value, (list, tuple)) and all(_accepts(item, v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this check does not understand: the dataclass decides


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(arg) for arg in _union_members(hint)))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "one of " + ", ".join(repr(member.value) for member in hint)
    if origin in (list, tuple, set):
        return f"a list (items: {_describe(args[0])})" if args else "a list"
    names = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string",
             type(None): "null", dict: "a mapping"}
    return names.get(origin or hint, getattr(hint, "__name__", str(hint)))


def _checked(label: str, hint, value):
    """`value` if it fits `hint` (a YAML 1.1 yes/no/on/off becomes a boolean for a field that takes booleans, such
    as `compaction: true | false | auto`), else RecipeError."""
    if isinstance(value, str) and value.lower() in _YAML11_BOOLS and _accepts(hint, True):
        value = _YAML11_BOOLS[value.lower()]
    if not _accepts(hint, value):
        raise RecipeError(f"{label}={value!r} is not valid: expected {_describe(hint)}.")
    return value


def _parse(section: str, prefix: str, cls, values, extra: tuple[str, ...] = ()):
    if not isinstance(values, dict):
        raise RecipeError(f"The recipe's {section} section must be a mapping of keys to values, got {values!r}.")
    valid = [f.name for f in fields(cls) if f.init]
    hints = typing.get_type_hints(cls)
    checked = {}
    for key, value in values.items():
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid + list(extra), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"Unknown key {key!r} in the recipe's {section} section.{hint}")
        checked[key] = _checked(f"{prefix}{key}", hints[key], value)
    try:
        (parsed,) = HfArgumentParser(cls).parse_dict(checked)
    except ValueError as error:  # the dataclass's own checks (ranges, choices, combinations)
        raise RecipeError(str(error)) from error
    return parsed


def _read(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"Recipe file {str(path)!r} does not exist (or is not a file); see recipes/ for examples.")
    try:
        values = parse_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"Recipe file {str(path)!r} is not valid YAML: {error}") from error
    if values is None:
        raise RecipeError(f"Recipe file {str(path)!r} is empty (or holds only comments); write its settings as in "
                          "recipes/quickstart.yaml.")
    if not isinstance(values, dict):
        raise RecipeError(f"Recipe file {str(path)!r} must be a mapping of keys to values (as in recipes/), "
                          f"got a {type(values).__name__}.")
    return values


def _check_training(training) -> None:
    """Trainer values that stock TRL or transformers would refuse only after the model has loaded (or, for
    `max_steps=0`, not at all: it runs one step at learning rate 0)."""
    rules = (
        ("max_completion_length", training.max_completion_length >= 1, ">= 1 (the tokens each completion may have)"),
        ("per_device_train_batch_size", training.per_device_train_batch_size >= 1, ">= 1"),
        ("gradient_accumulation_steps", training.gradient_accumulation_steps >= 1, ">= 1"),
        ("temperature", training.temperature > 0, "> 0 (TRL divides the logits by it; 1.0 samples the model as is)"),
        ("max_steps", training.max_steps != 0 and training.max_steps >= -1,
         ">= 1, or -1 to train num_train_epochs epochs (0 would train nothing)"),
    )
    for name, valid, expected in rules:
        if not valid:
            raise RecipeError(f"{name}={getattr(training, name)!r} is not valid: use {expected}.")


def preflight(recipe: Recipe) -> None:
    """Check what needs only the model's config and the saved predictor's JSON and safetensors header, before any
    weights load: the model path, `lenbalance.feature_layer` against the model's layers, `lenbalance.predictor_path`'s
    head against this run (the same `check_head` the engine applies) and its weights file, and, when
    `resume_from_checkpoint` names a checkpoint folder, the head saved in its `lenbalance/` against this run."""
    from ..builtin.models import model_config
    from ..generation.engine import check_head
    from ..predictor import read_head_config
    from ..predictor.head import WEIGHTS_NAME

    name, lenbalance = recipe.model.name_or_path, recipe.lenbalance
    try:
        text = model_config(name).get_text_config()
    except (OSError, ValueError) as error:
        raise RecipeError(f"model.name_or_path={name!r} cannot be loaded: {error}") from error
    layers = getattr(text, "num_hidden_layers", None)
    if layers is not None and lenbalance.feature_layer >= layers:
        raise RecipeError(f"lenbalance.feature_layer={lenbalance.feature_layer}, but {name!r} has {layers} decoder "
                          f"layers: use 0..{layers - 1}, or -1 for the final hidden state.")
    if lenbalance.predictor_path:
        try:
            head = read_head_config(lenbalance.predictor_path)
            check_head(head, lenbalance, text.hidden_size, recipe.training.max_completion_length,
                       lenbalance.predictor_path)
            _check_safetensors_header(Path(lenbalance.predictor_path, WEIGHTS_NAME))
        except (OSError, ValueError, TypeError) as error:
            raise RecipeError(f"lenbalance.predictor_path: {error}") from error
    if isinstance(recipe.resume_from_checkpoint, str):
        _check_resumed_head(recipe, text.hidden_size)


def _check_safetensors_header(path: Path) -> None:
    """Raise OSError if `path` is not a whole safetensors file: its header is read and checked to cover the file
    (a truncated copy fails here), no weights are loaded."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise OSError(f"cannot read {path} ({error}); copy the head again (a partial copy?), or unset "
                      "lenbalance.predictor_path to train a head from scratch.") from error


_HEAD_SETTINGS = {  # a saved head's contract (`engine.check_head`) -> the setting of this run that gives it back
    "hidden_size": lambda head: f"model.name_or_path at the model it was trained on (hidden_size={head.hidden_size})",
    "max_length": lambda head: f"max_completion_length={head.max_length}",
    "pooling": lambda head: f"lenbalance.pooling={head.pooling}",
    "feature_layer": lambda head: f"lenbalance.feature_layer={head.feature_layer}",
    "extra_features": lambda head: (f"none gives extra_features={head.extra_features} (a benchmark variant's input "
                                    "columns): unset lenbalance.predictor_path or resume another checkpoint"),
    "context_size": lambda head: f"lenbalance.context_features={str(bool(head.context_size)).lower()}",
}


def _check_resumed_head(recipe: Recipe, hidden_size: int) -> None:
    """Refuse to resume a checkpoint whose saved length head was trained with another contract than this run's
    settings give (e.g. another max_completion_length): `engine.load` would refuse it only after the model loads."""
    from ..generation.engine import head_config
    from ..predictor import read_head_config
    from ..predictor.head import CONFIG_NAME

    folder = Path(recipe.resume_from_checkpoint, "lenbalance")
    if not (folder / CONFIG_NAME).is_file():
        return  # no head saved there: resuming warns and starts the predictor fresh
    try:
        saved = read_head_config(folder)
    except (OSError, ValueError, TypeError):
        return  # unreadable: resuming warns and starts the head fresh
    wanted = head_config(recipe.lenbalance, hidden_size, recipe.training.max_completion_length)
    wrong = [name for name in _HEAD_SETTINGS if getattr(saved, name) != getattr(wanted, name)]
    if wrong:
        raise RecipeError(
            f"resume_from_checkpoint: the length head in {folder} was trained with "
            + ", ".join(f"{name}={getattr(saved, name)!r}" for name in wrong) + "; this run has "
            + ", ".join(f"{name}={getattr(wanted, name)!r}" for name in wrong) + ". Fix: resume with the settings "
            "the checkpoint was trained with (" + ", ".join(_HEAD_SETTINGS[name](saved) for name in wrong)
            + "), or start a new run in another output_dir."
        )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    """Read a recipe YAML (with `overrides` merged into its top level) into validated dataclasses."""
    from trl import GRPOConfig

    values = _read(path)
    for key, value in (overrides or {}).items():  # a section's overrides update that section, key by key
        base = values.get(key) or {}
        values[key] = base | value if isinstance(value, dict) and isinstance(base, dict) else value
    if "output_dir" in values and not str(values["output_dir"] or "").strip():  # TRL would train into trainer_output/
        raise RecipeError("output_dir is empty: set it to the folder for this run's checkpoints and summary, e.g. "
                          "--set output_dir=outputs/run1.")
    model = _parse("model", "model.", ModelArguments, values.pop("model", None) or {})
    task = _parse("task", "task.", TaskArguments, values.pop("task", None) or {})
    lenbalance = _parse("lenbalance", "lenbalance.", LenBalanceConfig, values.pop("lenbalance", None) or {})
    resume = _checked("resume_from_checkpoint", bool | str | None, values.pop("resume_from_checkpoint", None))
    if CHECKPOINTING == "gradient_checkpointing" and "activation_checkpointing" in values:  # the new name, older
        values["gradient_checkpointing"] = values.pop("activation_checkpointing")  # transformers
    if "gradient_checkpointing" not in values:  # TRL's default under transformers' new name: the old one warns
        values.setdefault(CHECKPOINTING, GRPOConfig.gradient_checkpointing)
    if not {"bf16", "fp16"} & values.keys() and (values.get("use_cpu") or not _cuda_available()):
        values["bf16"] = cpu_has_fast_bf16()  # TRL defaults to bf16, which is ~10x slower where the CPU emulates it
    training = _parse("top-level (GRPOConfig)", "", GRPOConfig, values, extra=SECTIONS)
    _check_training(training)
    try:
        lenbalance.check_trainer_args(training)  # settings that contradict the trainer's fail here, before any loading
    except ValueError as error:
        raise RecipeError(str(error)) from error
    prompts_per_step = training.generation_batch_size // training.num_generations
    if task.num_prompts < prompts_per_step:
        raise RecipeError(
            f"task.num_prompts={task.num_prompts} is fewer than one generation batch needs ({prompts_per_step} "
            f"prompts: generation_batch_size={training.generation_batch_size} / num_generations="
            f"{training.num_generations}), so no training step would run; raise task.num_prompts."
        )
    return Recipe(training, model, task, lenbalance, resume)
