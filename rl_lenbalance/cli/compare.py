"""Stock TRL against rl-lenbalance, in seconds, on the user's own hardware.

    rl-lenbalance compare recipes/quickstart.yaml --steps 4

Each variant is its own trainer, built from the same recipe, weights, data and seed, in a process of its own (run
in its main thread, as a user runs a trainer: on a CPU, torch runs the same ops about 1.2x slower in another
thread). The processes take turns one optimizer step at a time, in an order reversed every step (A B, B A, ...),
so none profits from a warmer machine, and each samples exactly what it would alone. Phases are timed with device
synchronisation at their edges (`torch.cuda.synchronize` on a GPU). Warm-up steps are dropped; medians are reported,
with ratios against stock measured in the same run. A variant that raises, or spends longer than the per-turn
timeout on one step, stops the comparison at once with a `CompareError` naming it and its step. Each process holds
its own device memory: N variants need N times the memory of one.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import multiprocessing
import resource
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import TrainerCallback

from .. import ledger
from ..loss import LAYOUT_KEY
from . import allocator

if TYPE_CHECKING:
    from rich.console import Console

PHASES = ("whole_step_s", "generation_s", "loss_phase_s")
STARTUP_TIMEOUT_S = 600.0  # a variant's process importing torch and the trainer: never timed


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
    page_faults: int = 0  # minor page faults of the process in the step (memory the allocator had handed back)
    generation_page_faults: int = 0

    @property
    def loss_phase_s(self) -> float:
        return self.whole_step_s - self.generation_s


def page_faults() -> int:
    """Minor page faults of this process so far: on a CPU, what the allocator handing memory back costs."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(base: type) -> type:
    """`base` (a TRL trainer class) with phase timers; it computes exactly what `base` computes."""

    class Timed(base):
        step_records: list[StepRecord]

        def _generate_and_score_completions(self, inputs):
            synchronize()
            start, faults = time.perf_counter(), page_faults()
            out = super()._generate_and_score_completions(inputs)
            synchronize()
            record = self.step_records[-1]
            record.generation_s += time.perf_counter() - start
            record.generation_page_faults += page_faults() - faults
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


class CompareError(RuntimeError):
    """A variant failed, or held its turn longer than the per-turn timeout: the comparison is over. `details` holds
    the failed variant's traceback, as its process printed it."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class Turn:
    """A variant's side of the turnstile, in the variant's own process: `take` blocks until the turn is handed over,
    `give_back` ends it and waits for the next one."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def take(self) -> None:
        self.conn.recv()

    def give_back(self) -> None:
        self.conn.send(("turn", None))
        self.take()


def _serve(job: Callable[[Turn], object], conn: Connection) -> None:
    """A variant's process: say it is ready (its imports done), wait for its first turn, run `job` and send back its
    result, or the error that ended it."""
    turn = Turn(conn)
    conn.send(("ready", None))
    turn.take()
    try:
        result = job(turn)
    except BaseException as error:  # any failure ends the comparison; the parent raises it, naming the variant
        conn.send(("error", (f"{type(error).__name__}: {error}", traceback.format_exc())))
        return
    conn.send(("done", result))


class Turnstile:
    """Runs each job (a variant) in a process of its own, in its main thread, one turn (an optimizer step) at a time,
    in an order reversed every round (A B, B A, ...). Each process has its own RNG, so a variant draws exactly what
    it would alone. The first failure, or a turn longer than `turn_timeout_s`, ends the comparison: `run` kills every
    process and raises `CompareError` naming the variant and its step."""

    def __init__(self, names: list[str], turn_timeout_s: float = 3600.0) -> None:
        self.names, self.turn_timeout_s = list(names), turn_timeout_s
        self.steps = dict.fromkeys(self.names, 0)  # turns handed over: the step a variant is in

    def _receive(self, name: str, conn: Connection, process, timeout_s: float, late: str) -> tuple[str, object]:
        """The variant's next message, within `timeout_s` (else `late` is the error)."""
        if not conn.poll(timeout_s):
            raise CompareError(late)
        try:
            return conn.recv()
        except EOFError:
            process.join(timeout=5)
            raise CompareError(f"variant {name!r} ended in step {self.steps[name]} without a word (exit code "
                               f"{process.exitcode}; killed for memory?).") from None

    def run(self, jobs: dict[str, Callable[[Turn], object]]) -> dict[str, object]:
        """Run every job (`name -> picklable callable taking a Turn`, which calls `turn.give_back()` at the end of
        each step) to its end in turns; return each job's result."""
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch thread pool inherited
        conns, processes, results = {}, {}, {}
        try:
            for name in self.names:
                conns[name], child = context.Pipe()
                processes[name] = context.Process(target=_serve, args=(jobs[name], child), name=f"compare-{name}",
                                                  daemon=True)
                processes[name].start()
                child.close()
            for name in self.names:
                self._receive(name, conns[name], processes[name], STARTUP_TIMEOUT_S,  # before any turn is timed
                              f"variant {name!r} did not start within {STARTUP_TIMEOUT_S:g} s.")
            for round_ in itertools.count():
                order = [n for n in (self.names if round_ % 2 == 0 else self.names[::-1]) if n not in results]
                if not order:
                    return results
                for name in order:
                    self.steps[name] += 1
                    conns[name].send("go")
                    kind, payload = self._receive(
                        name, conns[name], processes[name], self.turn_timeout_s,
                        f"variant {name!r} did not finish step {self.steps[name]} within turn_timeout_s="
                        f"{self.turn_timeout_s:g} s; the comparison stopped (a hang: a deadlock or a device that does "
                        "not answer; if one step really takes longer, raise the timeout: --turn-timeout).")
                    if kind == "done":
                        results[name] = payload
                    elif kind == "error":
                        message, details = payload
                        raise CompareError(f"variant {name!r} failed in step {self.steps[name]}: {message}", details)
        finally:  # a finished variant's process ends by itself (its exit handlers run); any other is killed
            for name, process in processes.items():
                process.join(timeout=60 if name in results else 0)
                process.kill()
                process.join()


class StepClock(TrainerCallback):
    """A `StepRecord` per optimizer step of a `timed` trainer, with its whole-step seconds and page faults."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        trainer.step_records = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.step_records.append(StepRecord())
        synchronize()
        self._start, self._faults = time.perf_counter(), page_faults()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        self.trainer.step_records[-1].whole_step_s = time.perf_counter() - self._start
        self.trainer.step_records[-1].page_faults = page_faults() - self._faults


class _TakeTurns(StepClock):
    """A `StepClock` that hands the turn back at the end of each step."""

    def __init__(self, turn: Turn, trainer) -> None:
        super().__init__(trainer)
        self.turn = turn

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        self.turn.give_back()


def _train_variant(build: Callable[[dict | None, str], object], name: str, settings: dict | None, warmup: int,
                   turn: Turn) -> dict:
    """A variant's job: build its trainer (in its first turn), train it step by step in turns, summarize it."""
    trainer = build(settings, name)
    trainer.add_callback(_TakeTurns(turn, trainer))
    trainer.train()
    return summarize(name, trainer, warmup, settings)


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
    run = ledger.summary(totals, trainer.state.log_history, len(records))
    completion_tokens = sum(r.completion_tokens for r in records)
    out = {"variant": name, "settings": settings, "steps": len(records), "warmup_steps": warmup,
           "malloc": allocator.in_force(),
           "peak_resident_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}  # this variant's process
    for phase in PHASES:
        out[f"{phase}_median"] = _median([getattr(r, phase) for r in records])
        out[f"{phase}_per_step"] = [getattr(r, phase) for r in records]
    out |= {
        "microstep_s_median": _median([s for r in records for s in r.microstep_s]),
        "page_faults_median": _median([r.page_faults for r in records]),
        "page_faults_per_step": [r.page_faults for r in records],
        "generation_page_faults_median": _median([r.generation_page_faults for r in records]),
        "generation_page_faults_per_step": [r.generation_page_faults for r in records],
        "completion_tokens": completion_tokens,
        "whole_s_per_1k_completion_tokens": 1000 * sum(r.whole_step_s for r in records) / max(completion_tokens, 1),
        "loss_pad_frac": run["loss_pad_frac"],
        "nonfinite_grad_steps": sum(not math.isfinite(g) for g in grad_norms),
    }
    if own is not None:
        out["predictor_overhead_frac"] = run["predictor_overhead_frac"]
    phase = getattr(trainer, "_lenbalance_loss", None)
    autotune = phase.tuner if phase is not None else None  # the tuner's own medians: what its choice was based on
    if autotune is not None and autotune.timings:
        out["autotune_s_per_ktok_median"] = {name: statistics.median(t) for name, t in autotune.timings.items()}
    generation = getattr(trainer, "_lenbalance_generation_tuner", None)
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
    `LenBalanceConfig` fields; `build` must pickle: a module-level function or a `functools.partial` of one), each
    in its own process, train them in turns and return one summary per variant. A variant that fails, or spends
    more than `turn_timeout_s` on one step, ends it with `CompareError`."""
    jobs = {name: functools.partial(_train_variant, build, name, settings, warmup)
            for name, settings in variants.items()}
    summaries = Turnstile(list(variants), turn_timeout_s).run(jobs)
    results = [summaries[name] for name in variants]
    add_ratios(results)
    return results


COLUMNS = (  # header, legend, cell
    ("step", "whole optimizer step", lambda r: f"{r['whole_step_s_median']:.2f}"),
    ("gen", "generation phase", lambda r: f"{r['generation_s_median']:.2f}"),
    ("loss", "loss phase", lambda r: f"{r['loss_phase_s_median']:.2f}"),
    ("micro", "one loss micro-step", lambda r: f"{r['microstep_s_median']:.3f}"),
    ("pad", "loss-forward tokens that are padding (below 0: fewer tokens than the rows hold, each shared prompt "
            "computed once)", lambda r: f"{r['loss_pad_frac']:.1%}"),
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


def _build_from_recipe(recipe, settings: dict | None, _name: str):
    """`compare_recipe`'s trainers: stock `GRPOTrainer` (`settings` None) or `LenBalanceGRPOTrainer` with these
    `LenBalanceConfig` fields, both `timed`."""
    from trl import GRPOTrainer

    from ..integrations import LenBalanceGRPOTrainer
    from .train import build_trainer

    if settings is None:
        return build_trainer(recipe, timed(GRPOTrainer))
    return build_trainer(replace(recipe, lenbalance=replace(recipe.lenbalance, **settings)),
                         timed(LenBalanceGRPOTrainer))


def compare_recipe(recipe_path: str, overrides: dict | None = None, steps: int = 4, warmup: int = 1,
                   turn_timeout_s: float = 3600.0, plans: list[str] | None = None) -> list[dict]:
    """Stock `GRPOTrainer` and `LenBalanceGRPOTrainer`, both as the recipe says (trained `steps` steps, nothing saved
    or reported), plus one `LenBalanceGRPOTrainer` per loss strategy in `plans` (`lenbalance.training_plan` pinned);
    prints the table and writes it to `output_dir/lenbalance_compare.json`."""
    from .recipe import load_recipe

    if steps <= warmup:
        raise ValueError(f"--steps={steps} leaves no step after the {warmup} warm-up step(s); use --steps {warmup + 1} "
                         "or more.")
    fixed = {"max_steps": steps, "save_strategy": "no", "report_to": "none", "disable_tqdm": True}
    recipe = load_recipe(recipe_path, (overrides or {}) | fixed)

    variants = {"stock": None, "lenbalance": {}} | {f"lenbalance_{plan}": {"training_plan": plan}
                                                    for plan in plans or ()}
    results = compare(functools.partial(_build_from_recipe, recipe), variants, warmup, turn_timeout_s)
    print_comparison(results)
    out = Path(recipe.training.output_dir, "lenbalance_compare.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"recipe": str(recipe_path), "overrides": overrides or {}, "results": results}, indent=2))
    print(f"written to {out}")
    return results
