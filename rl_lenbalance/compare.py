"""Stock TRL against rl-lenbalance, in seconds, on the user's own hardware, in one process.

    rl-lenbalance compare recipes/quickstart.yaml --steps 4

Each variant is its own trainer, built from the same recipe, weights, data and seed. The trainers run in threads
that take turns one optimizer step at a time, in an order reversed every step (A B, B A, ...), each on its own RNG
stream (saved and restored at every turn), so every variant sees the draws it would see alone and none profits
from a warmer machine. Phases are timed with device synchronisation at their edges (`torch.cuda.synchronize` on
a GPU). Warm-up steps are dropped; medians are reported, with ratios against stock measured in the same run. A
variant that raises, or spends longer than the per-turn timeout on one step, stops the comparison at once with a
`CompareError` naming it and its step.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import TrainerCallback

from . import ledger
from .loss import LAYOUT_KEY, STRATEGIES

if TYPE_CHECKING:
    from rich.console import Console

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
            layout = inputs.get(LAYOUT_KEY)  # rl-lenbalance's micro-batches say what their forward computes
            record.loss_tokens += layout.tokens if layout is not None else (inputs["prompt_ids"].numel()
                                                                            + inputs["completion_ids"].numel())
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


class CompareError(RuntimeError):
    """A variant failed, or held its turn longer than the per-turn timeout: the comparison is over."""


class _Stopped(Exception):
    """Raised in a job waiting for its turn once another job failed."""


class Turnstile:
    """Lets jobs in threads (trainers) run one turn (an optimizer step) at a time, in an order reversed every round,
    each on its own RNG stream (`rng`, set by the caller before `run`). The first failure, or a turn longer than
    `turn_timeout_s`, ends the comparison: `run` raises it at once, naming the variant and its step."""

    def __init__(self, names: list[str], turn_timeout_s: float = 3600.0) -> None:
        self.names, self.round, self.position = list(names), 0, 0
        self.finished: set[str] = set()
        self.steps = dict.fromkeys(self.names, 0)  # turns begun: the step a job is in
        self.holder: str | None = None  # whose turn is running
        self.rng: dict[str, tuple] = {}
        self.error: CompareError | None = None
        self.turn_timeout_s = turn_timeout_s
        self.turn_started = time.monotonic()  # when the current turn was handed over
        self.condition = threading.Condition()

    def _order(self) -> list[str]:
        order = self.names if self.round % 2 == 0 else self.names[::-1]
        return [name for name in order if name not in self.finished]

    def _current(self) -> str | None:
        order = self._order()
        return order[self.position] if self.position < len(order) else None

    def _step(self, name: str) -> int:
        """The step `name` is in: its running turn's, else the one it waits for (or sets up)."""
        return self.steps[name] + (self.holder != name)

    def acquire(self, name: str) -> None:
        """Block until it is `name`'s turn, then switch to its RNG stream; raises `_Stopped` once a job failed."""
        with self.condition:
            self.condition.wait_for(lambda: self.error is not None or self._current() == name)
            if self.error is not None:
                raise _Stopped
            self.steps[name] += 1
            self.holder = name
            _set_rng_state(self.rng[name])

    def release(self, name: str, finished: bool = False) -> None:
        """End `name`'s turn (for good with `finished`), saving its RNG stream."""
        with self.condition:
            if self._current() != name:  # a job that ended before its turn: just drop it
                self.finished.add(name)
            else:
                self.rng[name] = _rng_state()
                if finished:
                    self.finished.add(name)  # the next one in the order moves into this position
                else:
                    self.position += 1
                if self.position >= len(self._order()):
                    self.round, self.position = self.round + 1, 0
                self.holder, self.turn_started = None, time.monotonic()
            self.condition.notify_all()

    def _fail(self, message: str, cause: BaseException | None = None) -> None:
        """Record the first failure and wake every waiting job (the caller holds the condition)."""
        if self.error is None:
            self.error = CompareError(message)
            self.error.__cause__ = cause
        self.condition.notify_all()

    def run(self, jobs: dict[str, Callable[[], None]]) -> None:
        """Run each job (`name -> callable`, taking turns through `acquire`/`release`) in a daemon thread and return
        when all finished; raise `CompareError` as soon as one raises or a turn outlasts `turn_timeout_s` (a job
        that hangs stays behind in its daemon thread)."""

        def target(name: str) -> None:
            try:
                jobs[name]()
            except _Stopped:
                return
            except BaseException as error:  # any failure ends the comparison, raised in the caller's thread
                with self.condition:
                    self._fail(f"variant {name!r} failed in step {self._step(name)}: {type(error).__name__}: {error}",
                               error)
                return
            self.release(name, finished=True)

        threads = [threading.Thread(target=target, args=(name,), name=f"compare-{name}", daemon=True) for name in jobs]
        for thread in threads:
            thread.start()
        with self.condition:
            while self.error is None and len(self.finished) < len(self.names):
                left = self.turn_started + self.turn_timeout_s - time.monotonic()
                if left <= 0:
                    name = self._current()
                    self._fail(f"variant {name!r} did not finish step {self._step(name)} within "
                               f"turn_timeout_s={self.turn_timeout_s:g} s; the comparison stopped (a hang: a deadlock "
                               "or a device that does not answer; if one step really takes longer, raise the timeout: "
                               "--turn-timeout).")
                else:
                    self.condition.wait(left)
            if self.error is not None:
                raise self.error
        for thread in threads:
            thread.join()


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


def run_alternating(trainers: dict[str, object], turn_timeout_s: float = 3600.0) -> None:
    """Train every trainer (built with `timed`) to its end, one optimizer step each in turn; raises `CompareError`
    as soon as one fails or a step outlasts `turn_timeout_s`."""
    turnstile = Turnstile(list(trainers), turn_timeout_s)
    for name, trainer in trainers.items():
        trainer.step_records = []
        trainer.add_callback(_TakeTurns(turnstile, name, trainer))
        turnstile.rng[name] = _rng_state()
    turnstile.run({name: trainer.train for name, trainer in trainers.items()})


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def summarize(name: str, trainer, warmup: int, settings: dict | None) -> dict:
    """Medians over the steps after `warmup`, the run's health, and from `ledger.summary` over the same steps the
    padding (`ledger.waste`), the predictor's overhead and an autotuned training plan."""
    records = trainer.step_records[warmup:]
    own = getattr(trainer, "lenbalance_totals", None)  # rl-lenbalance's variants: the predictor's overhead
    grad_norms = [row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row]
    totals = ledger.RunTotals(loss_tokens=sum(r.loss_tokens for r in records),
                              loss_real_tokens=sum(r.loss_real_tokens for r in records),
                              generate_s=own.generate_s if own else 0.0,
                              predictor_overhead_s=own.predictor_overhead_s if own else 0.0)
    run = ledger.summary(totals, trainer.state.log_history, len(records), plan_names=list(STRATEGIES))
    completion_tokens = sum(r.completion_tokens for r in records)
    out = {"variant": name, "settings": settings, "steps": len(records), "warmup_steps": warmup}
    for phase in PHASES:
        out[f"{phase}_median"] = _median([getattr(r, phase) for r in records])
        out[f"{phase}_per_step"] = [getattr(r, phase) for r in records]
    out |= {
        "microstep_s_median": _median([s for r in records for s in r.microstep_s]),
        "completion_tokens": completion_tokens,
        "whole_s_per_1k_completion_tokens": 1000 * sum(r.whole_step_s for r in records) / max(completion_tokens, 1),
        "loss_pad_frac": run["loss_pad_frac"],
        "nonfinite_grad_steps": sum(not math.isfinite(g) for g in grad_norms),
    }
    if own is not None:
        out["predictor_overhead_frac"] = run["predictor_overhead_frac"]
    autotune = getattr(trainer, "_autotune", None)  # the tuner's own medians: what its choice was based on
    if autotune is not None and autotune.timings:
        out["autotune_s_per_ktok_median"] = {name: statistics.median(t) for name, t in autotune.timings.items()}
    generation = getattr(trainer, "_gen_autotune", None)
    if generation is not None and generation.timings:
        out["generation_s_per_step_median"] = {name: statistics.median(t) for name, t in generation.timings.items()}
    keys = ("autotune_choice", "autotune_ratio_vs_stock", "generation_plan", "generation_plan_ratio_vs_stock")
    return out | {key: run[key] for key in keys if key in run}


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


def compare(build: Callable[[dict | None, str], object], variants: dict[str, dict | None], warmup: int = 1,
            turn_timeout_s: float = 3600.0) -> list[dict]:
    """Build one trainer per variant (`build(None, name)`: stock; `build(settings, name)`: rl-lenbalance with these
    `LenBalanceConfig` fields), train them in alternation and return one summary per variant. A variant that fails,
    or spends more than `turn_timeout_s` on one step, ends it with `CompareError`."""
    trainers = {name: build(settings, name) for name, settings in variants.items()}
    run_alternating(trainers, turn_timeout_s)
    results = [summarize(name, trainers[name], warmup, variants[name]) for name in variants]
    add_ratios(results)
    return results


COLUMNS = (  # header, legend, cell
    ("step", "whole optimizer step", lambda r: f"{r['whole_step_s_median']:.2f}"),
    ("gen", "generation phase", lambda r: f"{r['generation_s_median']:.2f}"),
    ("loss", "loss phase", lambda r: f"{r['loss_phase_s_median']:.2f}"),
    ("micro", "one loss micro-step", lambda r: f"{r['microstep_s_median']:.3f}"),
    ("pad", "loss-forward tokens that are padding", lambda r: f"{r['loss_pad_frac']:.1%}"),
    ("×stock", "stock's whole step over the variant's (above 1: faster)",
     lambda r: f"{r.get('speedup_whole_step_s', math.nan):.2f}×"),
    ("×/tok", "the same per completion token", lambda r: f"{r.get('speedup_per_completion_token', math.nan):.2f}×"),
)


def print_comparison(results: list[dict], console: Console | None = None) -> None:
    """A table that fits an 80-column terminal: per-phase median seconds, padding and the ratios against stock, a
    legend under it, and each variant's autotuned training plan where it logged one, and its generation plan where
    it measured one or ran compaction."""
    from rich.console import Console
    from rich.table import Table

    legend = "; ".join(f"{header}: {meaning}" for header, meaning, _ in COLUMNS)
    plans = [f"{r['variant']}: training plan: {ledger.training_plan(r)}" for r in results if "autotune_choice" in r]
    plans += [f"{r['variant']}: generation plan: {ledger.generation_plan(r)}" for r in results
              if r.get("generation_plan") not in (None, "stock")
              or ledger.finite(r.get("generation_plan_ratio_vs_stock"))]
    table = Table(title=f"median seconds per optimizer step ({results[0]['steps']} steps after "
                        f"{results[0]['warmup_steps']} warm-up, variants in alternation)",
                  caption="\n".join([legend, *plans]), caption_justify="left")
    table.add_column("variant", overflow="fold")
    for header, _, _ in COLUMNS:
        table.add_column(header, justify="right", no_wrap=True)
    for r in results:
        table.add_row(r["variant"], *(cell(r) for _, _, cell in COLUMNS))
    (console or Console()).print(table)


def compare_recipe(recipe_path: str, overrides: dict | None = None, steps: int = 4, warmup: int = 1,
                   turn_timeout_s: float = 3600.0, plans: list[str] | None = None) -> list[dict]:
    """Stock `GRPOTrainer` and `LenBalanceGRPOTrainer`, both as the recipe says (trained `steps` steps, nothing saved
    or reported), plus one `LenBalanceGRPOTrainer` per loss strategy in `plans` (`lenbalance.training_plan` pinned);
    prints the table and writes it to `output_dir/lenbalance_compare.json`."""
    from trl import GRPOTrainer

    from .integrations import LenBalanceGRPOTrainer
    from .recipe import load_recipe
    from .train import build_trainer

    if steps <= warmup:
        raise ValueError(f"--steps={steps} leaves no step after the {warmup} warm-up step(s); use --steps {warmup + 1} "
                         "or more.")
    fixed = {"max_steps": steps, "save_strategy": "no", "report_to": "none", "disable_tqdm": True}
    recipe = load_recipe(recipe_path, (overrides or {}) | fixed)

    def build(settings: dict | None, _name: str):
        if settings is None:
            return build_trainer(recipe, timed(GRPOTrainer))
        return build_trainer(replace(recipe, lenbalance=replace(recipe.lenbalance, **settings)),
                             timed(LenBalanceGRPOTrainer))

    variants = {"stock": None, "lenbalance": {}} | {f"lenbalance_{plan}": {"training_plan": plan} for plan in plans or ()}
    results = compare(build, variants, warmup, turn_timeout_s)
    print_comparison(results)
    out = Path(recipe.training.output_dir, "lenbalance_compare.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"recipe": str(recipe_path), "overrides": overrides or {}, "results": results}, indent=2))
    print(f"written to {out}")
    return results
