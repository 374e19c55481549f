"""What several test modules build the same way: the prompts, the rewards, the trainer builders and the check that
rl-lenbalance's update is stock's. (Fixtures live in conftest.py, the vLLM stand-in in stand_ins.py; the
tests/distributed workers run as scripts of their own.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig

from rl_lenbalance import LenBalanceConfig, LenBalanceGRPOTrainer
from rl_lenbalance.cli.recipe import CHECKPOINTING
from rl_lenbalance.config import cpu_has_fast_bf16

REPO = Path(__file__).parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
PROMPTS = ["What is 2+2?", "List 5 fruits.", "Write a poem about the sea.", "Hi", "Explain gravity.", "Count to 9."]


def chat(prompts: list[str]) -> list[list[dict]]:
    """Each prompt as a one-turn conversation, as TRL's conversational datasets hold it."""
    return [[{"role": "user", "content": p}] for p in prompts]


def prompt_dataset() -> Dataset:
    """PROMPTS four times over, conversational: 24 rows."""
    return Dataset.from_list([{"prompt": conversation} for conversation in chat(PROMPTS * 4)])


def length_reward(completion_ids, **kwargs) -> list[float]:
    return [len(c) / 32.0 for c in completion_ids]


def varied_reward(completion_ids, **kwargs) -> list[float]:
    return [len(c) / 16.0 + (c[0] % 7) / 7.0 for c in completion_ids]  # varies inside every group


def make_args(tmp_path: Path, **overrides) -> GRPOConfig:
    """GRPO on CPU, 2 steps of 8 rows (groups of 4) in 2 micro-batches, sampled, no checkpoints, no reporting."""
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                  gradient_accumulation_steps=2, max_completion_length=32, max_steps=2, use_cpu=True,
                  report_to="none", save_strategy="no", logging_steps=1, seed=0, beta=0.0, loss_type="dapo",
                  temperature=1.0, top_k=0, bf16=cpu_has_fast_bf16())
    values.update(overrides)
    return GRPOConfig(**values)


def make_trainer(cls, model_dir, args, **kwargs):
    """`cls` (a GRPO or RLOO trainer, stock or rl-lenbalance) on the float32 model in `model_dir`, rewarding length,
    over `prompt_dataset()`; `kwargs` go to the trainer."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return cls(model=model, processing_class=tokenizer, reward_funcs=length_reward, args=args,
               train_dataset=prompt_dataset(), **kwargs)


def train(cls, model_dir, tmp_path, tokenizer=None, trainer_kwargs=None, lenbalance=None, dtype=torch.float64,
          model_kwargs=None, **overrides):
    """One short SGD run of `cls` (stock or rl-lenbalance); returns the trainer, its initial parameters in
    `trainer.initial`, and the `input_ids` shapes of the model's forwards with gradients (the loss forwards) in
    `trainer.loss_forward_shapes`."""
    values = dict(output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=4, num_generations=4,
                  gradient_accumulation_steps=2, max_completion_length=16, max_steps=2, use_cpu=True,
                  report_to="none", save_strategy="no", logging_steps=1, seed=0, beta=0.0, loss_type="dapo",
                  temperature=1.0, top_k=0, learning_rate=1e-2, optim="sgd", max_grad_norm=0.0,
                  **{CHECKPOINTING: False}, bf16=cpu_has_fast_bf16())
    values.update(overrides)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **(model_kwargs or {}))
    lenbalance = lenbalance or LenBalanceConfig(predictor_steps_per_round=5, max_overhead=1.0)  # every round learns
    extra = {"lenbalance_config": lenbalance} if cls is LenBalanceGRPOTrainer else {}
    trainer = cls(model=model, processing_class=tokenizer, reward_funcs=varied_reward, args=GRPOConfig(**values),
                  train_dataset=prompt_dataset(), **(trainer_kwargs or {}), **extra)
    trainer.initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.loss_forward_shapes = []

    def record(module, args, kwargs):
        if torch.is_grad_enabled():
            trainer.loss_forward_shapes.append(tuple(kwargs["input_ids"].shape))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    trainer.train()
    hook.remove()
    return trainer


def assert_same_update(stock, ours, tol: float = 1e-8) -> None:
    """The parameters moved, and both trainers moved them to the same place (up to float64 reordering error)."""
    theirs = dict(stock.model.named_parameters())
    assert max(((p - stock.initial[n]).norm() / p.norm()).item() for n, p in theirs.items()) > 1e-6
    rel = max(((theirs[n] - p).norm() / theirs[n].norm()).item() for n, p in ours.model.named_parameters())
    assert rel < tol, rel
    losses = [[r["loss"] for r in t.state.log_history if "loss" in r] for t in (stock, ours)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-6)  # a GRPO loss is ~0: compare absolutely


def assert_same(a, b, where: str = "state") -> None:
    """`a` equals `b` exactly, tensors (on any device), dicts, lists and tuples compared element by element; the
    failure names the path to the first difference."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a.cpu(), b.cpu()), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def grad_gap(ours, reference) -> float:
    """Largest gradient difference, relative to the largest reference gradient."""
    scale = max(g.abs().max().item() for g in reference)
    return max((a - b).abs().max().item() for a, b in zip(ours, reference)) / scale


def gap(a, b) -> float:
    """Largest absolute difference, in float64."""
    return (a.double() - b.double()).abs().max().item()


def tiny_decoder(model_dir, max_new_tokens: int, do_sample: bool, copies: int):
    """For rollout rounds without TRL: the float32 model in `model_dir` (eval), its tokenizer, a generation config,
    4 prompts `copies` times each, and a `Backend.decode` over `compacted_generate` (finished rows leave the batch
    when the rollout compacts)."""
    from transformers import GenerationConfig

    from rl_lenbalance.generation.decode import compacted_generate

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generation = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    prompts = [tokenizer(text)["input_ids"] for text in ["Hi", "Tell me a story", "2+2?", "Why?"]
               for _ in range(copies)]

    def decode(batch, captured, *, compact, prefixes=None, max_steps=None):
        return compacted_generate(model, batch, generation, tokenizer.pad_token_id, on_compact=captured.compact,
                                  min_finished=1 if compact else len(batch) + 1, prefixes=prefixes,
                                  max_steps=max_steps)

    return model, tokenizer, generation, prompts, decode


def checkpointing_recipe(path: Path, model_dir, output_dir: Path, **keys) -> Path:
    """A recipe for `rl-lenbalance train`, written to `path`: `model_dir` for up to 50 steps, a checkpoint every step
    (`keys` add or override recipe keys)."""
    recipe = {"model": {"name_or_path": str(model_dir)}, "task": {"num_prompts": 16}, "output_dir": str(output_dir),
              "use_cpu": True, "max_steps": 50, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
              "num_generations": 4, "max_completion_length": 8, "save_strategy": "steps", "save_steps": 1,
              "report_to": "none"} | keys
    path.write_text(yaml.safe_dump(recipe))
    return path


def cli_env(**extra: str) -> dict:
    """The environment of a CLI subprocess: this checkout on the path, one thread, no WANDB_MODE from conftest."""
    env = {key: value for key, value in os.environ.items() if key != "WANDB_MODE"}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                  **extra}


def enable_checkpointing(model) -> None:
    """The model's activation checkpointing on, under this transformers' name for it."""
    getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable()
