"""Stock TRL against rl-lenbalance, in seconds, on the user's own hardware, in one process.

    rl-lenbalance compare recipes/quickstart.yaml --steps 4

Each variant is its own trainer, built from the same recipe, weights, data and seed. The trainers run in threads
that take turns one optimizer step at a time, in an order reversed every step (A B, B A, ...), each on its own RNG
stream (saved and restored at every turn), so every variant sees the draws it would see alone and none profits
from a warmer machine. Phases are timed with device synchronisation at their edges (`torch.cuda.synchronize` on
a GPU). Warm-up steps are dropped; medians are reported, with ratios against stock measured in the same run.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

PHASES = ("whole_step_s", "generation_s", "loss_phase_s")


def synchronize() -> None:
    """Wait for queued device work, so that the host clock measures it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class StepRecord:
    """One optimizer step of one variant."""

    whole_step_s: float = 0.0
    generation_s: float = 0.0
    completion_tokens: int = 0
    loss_tokens: int = 0
    loss_real_tokens: int = 0
    microstep_s: list[float] = field(default_factory=list)  # each micro-step's loss forward + backward

    @property
    def loss_phase_s(self) -> float:
        return self.whole_step_s - self.generation_s


def timed(base: type) -> type:
    """`base` (a TRL trainer class) with phase timers; it computes exactly what `base` computes."""

    class Timed(base):
        step_records: list[StepRecord]

        def _generate_and_score_completions(self, inputs):
            synchronize()
            start = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            synchronize()
            record = self.step_records[-1]
            record.generation_s += time.perf_counter() - start
            record.completion_tokens += int(out["completion_mask"].sum())
            return out

        def training_step(self, *args, **kwargs):
            record = self.step_records[-1]
            generated_before = record.generation_s
            synchronize()
            start = time.perf_counter()
            out = super().training_step(*args, **kwargs)
            synchronize()
            record.microstep_s.append(time.perf_counter() - start - (record.generation_s - generated_before))
            return out

        def compute_loss(self, model, inputs, *args, **kwargs):
            record = self.step_records[-1]
            record.loss_tokens += inputs["prompt_ids"].numel() + inputs["completion_ids"].numel()
            record.loss_real_tokens += int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

    Timed.__name__ = Timed.__qualname__ = f"Timed{base.__name__}"
    return Timed


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _set_rng_state(state: tuple) -> None:
    cpu, cuda, python, numpy = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python)
    np.random.set_state(numpy)


class Turnstile:
    """Lets trainers in threads run one optimizer step at a time, in an order reversed every round."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.round, self.position = list(names), 0, 0
        self.finished: set[str] = set()
        self.rng: dict[str, tuple] = {}
        self.condition = threading.Condition()

    def _order(self) -> list[str]:
        order = self.names if self.round % 2 == 0 else self.names[::-1]
        return [name for name in order if name not in self.finished]

    def _current(self) -> str | None:
        order = self._order()
        return order[self.position] if self.position < len(order) else None

    def acquire(self, name: str) -> None:
        """Block until it is `name`'s turn, then switch to its RNG stream."""
        with self.condition:
            self.condition.wait_for(lambda: self._current() == name)
            _set_rng_state(self.rng[name])

    def release(self, name: str, finished: bool = False) -> None:
        """End `name`'s turn (for good with `finished`), saving its RNG stream."""
        with self.condition:
            if self._current() != name:  # a trainer that failed before its turn: just drop it
                self.finished.add(name)
            else:
                self.rng[name] = _rng_state()
                if finished:
                    self.finished.add(name)  # the next one in the order moves into this position
                else:
                    self.position += 1
                if self.position >= len(self._order()):
                    self.round, self.position = self.round + 1, 0
            self.condition.notify_all()


class _TakeTurns(TrainerCallback):
    """Holds the turnstile for one trainer from the end of its previous step to the end of this one."""

    def __init__(self, turnstile: Turnstile, name: str, trainer) -> None:
        self.turnstile, self.name, self.trainer = turnstile, name, trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.turnstile.acquire(self.name)

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.step_records.append(StepRecord())
        synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        self.trainer.step_records[-1].whole_step_s = time.perf_counter() - self._start
        self.turnstile.release(self.name)
        self.turnstile.acquire(self.name)


def run_alternating(trainers: dict[str, object]) -> dict[str, BaseException]:
    """Train every trainer (built with `timed`) to its end, one optimizer step each in turn; returns the errors."""
    turnstile = Turnstile(list(trainers))
    errors: dict[str, BaseException] = {}
    for name, trainer in trainers.items():
        trainer.step_records = []
        trainer.add_callback(_TakeTurns(turnstile, name, trainer))
        turnstile.rng[name] = _rng_state()

    def train(name: str) -> None:
        try:
            trainers[name].train()
        except BaseException as error:  # reported by the caller; the other variants go on
            errors[name] = error
        finally:
            turnstile.release(name, finished=True)

    threads = [threading.Thread(target=train, args=(name,), name=f"compare-{name}") for name in trainers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def summarize(name: str, trainer, warmup: int, settings: dict | None) -> dict:
    """Medians over the steps after `warmup`, padding over the same steps, and the run's health."""
    records = trainer.step_records[warmup:]
    loss_tokens = sum(r.loss_tokens for r in records)
    completion_tokens = sum(r.completion_tokens for r in records)
    grad_norms = [row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row]
    out = {"variant": name, "settings": settings, "steps": len(records), "warmup_steps": warmup}
    for phase in PHASES:
        out[f"{phase}_median"] = _median([getattr(r, phase) for r in records])
        out[f"{phase}_per_step"] = [getattr(r, phase) for r in records]
    out |= {
        "microstep_s_median": _median([s for r in records for s in r.microstep_s]),
        "completion_tokens": completion_tokens,
        "whole_s_per_1k_completion_tokens": 1000 * sum(r.whole_step_s for r in records) / max(completion_tokens, 1),
        "loss_pad_frac": 1 - sum(r.loss_real_tokens for r in records) / loss_tokens if loss_tokens else math.nan,
        "nonfinite_grad_steps": sum(not math.isfinite(g) for g in grad_norms),
    }
    totals = getattr(trainer, "lenbalance_totals", None)
    if totals is not None and totals.generate_s:
        out["predictor_overhead_frac"] = totals.predictor_overhead_s / totals.generate_s
    return out


def add_ratios(results: list[dict]) -> None:
    """Stock's median over each variant's (above 1: the variant is faster), per phase and per completion token."""
    stock = next((r for r in results if r["variant"] == "stock"), None)
    if stock is None:
        return
    for result in results:
        for phase in PHASES:
            result[f"speedup_{phase}"] = stock[f"{phase}_median"] / result[f"{phase}_median"]
        result["speedup_per_completion_token"] = (stock["whole_s_per_1k_completion_tokens"]
                                                  / result["whole_s_per_1k_completion_tokens"])


def compare(build: Callable[[dict | None, str], object], variants: dict[str, dict | None],
            warmup: int = 1) -> list[dict]:
    """Build one trainer per variant (`build(None, name)`: stock; `build(settings, name)`: rl-lenbalance with these
    `LenBalanceConfig` fields), train them in alternation and return one summary per variant."""
    trainers = {name: build(settings, name) for name, settings in variants.items()}
    errors = run_alternating(trainers)
    for name, error in errors.items():
        raise RuntimeError(f"variant {name!r} failed: {type(error).__name__}: {error}") from error
    results = [summarize(name, trainers[name], warmup, variants[name]) for name in variants]
    add_ratios(results)
    return results


def print_comparison(results: list[dict]) -> None:
    """A rich table: per-phase median seconds, padding and the ratio against stock."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"stock TRL vs rl-lenbalance: median seconds per optimizer step ({results[0]['steps']} steps "
                        f"after {results[0]['warmup_steps']} warm-up, measured in alternation)")
    for column in ("variant", "whole step", "generation", "loss phase", "loss micro-step", "loss tokens padded",
                   "vs stock (whole step)", "vs stock (per completion token)"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in results:
        table.add_row(r["variant"], f"{r['whole_step_s_median']:.2f} s", f"{r['generation_s_median']:.2f} s",
                      f"{r['loss_phase_s_median']:.2f} s", f"{r['microstep_s_median']:.3f} s", f"{r['loss_pad_frac']:.1%}",
                      f"{r.get('speedup_whole_step_s', math.nan):.2f}×",
                      f"{r.get('speedup_per_completion_token', math.nan):.2f}×")
    Console().print(table)


def compare_recipe(recipe_path: str, overrides: dict | None = None, steps: int = 4, warmup: int = 1) -> list[dict]:
    """Stock `GRPOTrainer` and `LenBalanceGRPOTrainer`, both as the recipe says (trained `steps` steps, nothing saved
    or reported); prints the table and writes it to `output_dir/lenbalance_compare.json`."""
    from trl import GRPOTrainer

    from .integrations import LenBalanceGRPOTrainer
    from .recipe import load_recipe
    from .train import build_trainer

    if steps <= warmup:
        raise ValueError(f"--steps={steps} leaves no step after the {warmup} warm-up step(s); use --steps {warmup + 2} "
                         "or more.")
    fixed = {"max_steps": steps, "save_strategy": "no", "report_to": "none", "disable_tqdm": True}
    recipe = load_recipe(recipe_path, (overrides or {}) | fixed)

    def build(settings: dict | None, _name: str):
        return build_trainer(recipe, timed(GRPOTrainer if settings is None else LenBalanceGRPOTrainer))

    results = compare(build, {"stock": None, "lenbalance": {}}, warmup)
    print_comparison(results)
    out = Path(recipe.training.output_dir, "lenbalance_compare.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"recipe": str(recipe_path), "overrides": overrides or {}, "results": results}, indent=2))
    print(f"written to {out}")
    return results
