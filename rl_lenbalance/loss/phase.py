"""The loss phase's lifecycle, framework-free: what `generation.rollout` is to a round, this is to the passes over a
generation batch.

A `LossPhase` decides which exact strategies a run may use, lets its tuner pick one for each pass, cuts the pass into
micro-batches (each carrying its `Layout`), counts it in the ledger and times it on one clock, the same for the tuner
and for the loss phase's seconds. The trainer adapter supplies the ranks (`Ranks`: an `accelerate.Accelerator` is
one), the exchange of rows between them, and hands the micro-batches to its trainer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..ledger import RunTotals, TrainingLedger, gather_ledgers, named, training_metrics
from ..schedule import AUTO, OFF, Autotuner, TrainingPlan, optimizer_steps, take_rows, trim_padding
from . import STRATEGIES, exact_strategies
from .packed import DENSE_PACK_MAX_TOKENS, skips_masked_blocks
from .shared_prompt import prompt_groups
from .strategies import LAYOUT_KEY, PassRows, Strategy

Warn = Callable[[str, str], None]  # (key, message): warns once per key
Exchange = Callable[[dict, TrainingPlan], dict]  # the rows a plan gives this rank, in its order


class Ranks(Protocol):
    """The data-parallel ranks, as the loss phase reaches them."""

    num_processes: int
    process_index: int
    device: torch.device

    def gather(self, tensor: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class LossSettings:
    """What the loss phase is asked to do (`LenBalanceConfig.loss_settings()`)."""

    training_plan: str = AUTO  # a strategy's name, 'auto' (measured) or 'off' (stock's micro-batches)
    autotune_samples: int = 2
    autotune_margin: float = 0.03
    autotune_every: int = 20
    balance_ranks: bool = True
    attention_alpha: float = 0.0
    partition_method: str = "best"


@dataclass
class LossPass:
    """A generation batch in the loss phase: its rows, stock's shuffle of them, and the current pass over it (one of
    `num_iterations`), cut into micro-batches by one strategy and timed from its first micro-step to its last."""

    batch: dict | None  # None: the trainer's own micro-batches (multimodal rows), not planned nor timed
    shuffle: torch.Tensor | None
    microbatches: list[dict] = field(default_factory=list)  # each carries its `Layout` under `LAYOUT_KEY`
    strategy: str = ""
    stock_tokens: float = 0.0  # every rank's tokens as stock's micro-batches compute them (rows padded to the batch)
    started: float = 0.0
    rows: list[int] = field(default_factory=list)  # a regrouping pass: its rows' ids (rank-major over every rank's)
    # its loss forwards' (logps, entropies), detached, one per micro-batch so far: the adapter scores stock's
    # micro-batches with them, to log per-token metrics as stock would
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


class LossPhase:
    """The strategies a run may use, the tuner choosing among them, and the generation batch being trained.

    `blockers`: the trainer's settings under which regrouping rows would change the update (`regrouping_blockers`).
    """

    def __init__(self, settings: LossSettings, model: torch.nn.Module, blockers: Sequence[str], warn: Warn) -> None:
        self.settings, self._warn = settings, warn
        self.left_padding_free = not absolute_positions(model)  # a row's outputs ignore its left padding
        # the longest sequence one packed forward runs under a dense (N, N) mask (None: the kernel skips masked blocks)
        self.dense_max_tokens = None if skips_masked_blocks(model) else DENSE_PACK_MAX_TOKENS
        if not self.left_padding_free and settings.training_plan != OFF:
            warn("positions", f"{type(model).__name__} adds absolute position embeddings, so a row's left padding "
                 "changes its outputs: rl-lenbalance keeps stock's prompt padding and every row on its rank "
                 "(micro-batches are still length-sorted and their completions trimmed).")
        candidates = self._candidates(model, list(blockers)) if settings.training_plan != OFF else ["stock"]
        first = next(name for name in ("sorted", "stock_trimmed", "stock") if name in candidates + ["stock"])
        self.tuner = Autotuner(candidates, first, samples=settings.autotune_samples,
                               margin=settings.autotune_margin, recheck_every=settings.autotune_every)
        self.current: LossPass | None = None  # the generation batch being trained, and its current pass

    def _candidates(self, model: torch.nn.Module, blockers: list[str]) -> list[str]:
        """Every exact strategy that runs on this model for 'auto' (a one-time note names those left out), else the
        one asked for (or an exact stand-in, with a one-time note)."""
        plan = self.settings.training_plan
        exact = exact_strategies(blockers)
        asked = exact if plan == AUTO else [plan]
        why = {name: STRATEGIES[name].unsupported(model) for name in asked if name in exact}
        runs = [name for name in exact if name in why and why[name] is None]
        if plan == AUTO:
            if blockers:
                self._warn("plan", f"{'; '.join(blockers)}: regrouping rows would change what is learned, so "
                           "rl-lenbalance keeps stock's micro-batches (only all-padding columns are cut).")
            left_out = [f"'{name}' ({reason})" for name, reason in why.items() if reason is not None]
            if left_out:
                self._warn("plan_left_out", f"lenbalance.training_plan='auto' leaves out {'; '.join(left_out)}; "
                           f"it measures {', '.join(runs)}.")
            return runs
        if runs:
            return runs
        if plan in exact:  # exact here, but this model cannot run its forward
            self._warn("plan", f"lenbalance.training_plan={plan!r}: {why[plan]}; using 'sorted' (length-sorted "
                       "micro-batches, padding trimmed), which is exact.")
            return ["sorted"]
        self._warn("plan", f"lenbalance.training_plan={plan!r} regroups rows, which would change what is learned "
                   f"with {'; '.join(blockers)}; using 'stock_trimmed' (stock's micro-batches, all-padding columns "
                   "cut), which is exact.")
        return ["stock_trimmed"]

    def plans(self, steps_per_generation: int, gradient_accumulation_steps: int) -> bool:
        """Whether training micro-batches are this phase's (else the trainer's own): not when the plan is 'off', nor
        when an optimizer step spans two generation batches (a one-time note says so)."""
        if self.settings.training_plan == OFF:
            return False
        spg, ga = steps_per_generation, gradient_accumulation_steps
        if spg % ga:
            self._warn("steps_per_generation", f"steps_per_generation={spg} is not a multiple of "
                       f"gradient_accumulation_steps={ga}: optimizer steps span two generation batches, so no row "
                       "can be regrouped without changing the update; training runs as stock TRL (generation is "
                       "still captured and predicted).")
        return spg % ga == 0

    def begin(self, batch: dict | None, microbatches: list[dict] | None = None) -> LossPass:
        """A new generation batch: its rows and stock's shuffle of them (drawn as stock draws it), or, for `batch`
        None, the trainer's own `microbatches`, trained as they are."""
        if batch is None:
            self.current = LossPass(None, None, microbatches or [])
        else:
            self.current = LossPass(batch, torch.randperm(len(batch["advantages"])))
        return self.current

    def start_pass(self, ranks: Ranks, exchange: Exchange, totals: RunTotals, steps_per_generation: int,
                   gradient_accumulation_steps: int) -> dict[str, float]:
        """Cut the current generation batch by the tuner's next strategy (each micro-batch with its layout), count
        it in `totals`, and start the pass's clock. Returns the pass's ledger metrics (every rank's)."""
        loss_pass, strategy = self.current, STRATEGIES[self.tuner.next()]
        batch = loss_pass.batch
        plan = strategy.plan(self._pass_rows(ranks, batch, loss_pass.shuffle, strategy, steps_per_generation,
                                             gradient_accumulation_steps))
        trained = exchange(batch, plan) if plan.exchange else take_rows(batch, [row - plan.offset for row in plan.rows])
        bounds = [sum(plan.sizes[:i]) for i in range(len(plan.sizes) + 1)]
        microbatches = [take_rows(trained, list(range(a, b))) for a, b in zip(bounds, bounds[1:])]
        if strategy.trims:
            microbatches = [trim_padding(b, self.left_padding_free) for b in microbatches]
        for b in microbatches:
            b[LAYOUT_KEY] = strategy.layout(b, self.dense_max_tokens)
        stock_width = batch["prompt_ids"].size(1) + batch["completion_ids"].size(1)  # stock pads every row to it
        ledger = TrainingLedger(loss_tokens=sum(b[LAYOUT_KEY].tokens for b in microbatches),
                                loss_tokens_stock=len(trained["advantages"]) * stock_width,
                                real_tokens=sum(int(b["prompt_mask"].sum() + b["completion_mask"].sum())
                                                for b in microbatches), rows_moved_in=plan.moved_in)
        every_rank = gather_ledgers(ledger, ranks.gather, ranks.device)
        totals.add_training(every_rank, 1)
        rows = len(batch["advantages"])
        loss_pass.strategy, loss_pass.microbatches, loss_pass.outputs = strategy.name, microbatches, []
        loss_pass.rows = ([row - plan.offset + ranks.process_index * rows for row in plan.rows]
                          if strategy.regroups else [])
        loss_pass.stock_tokens = sum(r.loss_tokens_stock for r in every_rank)
        loss_pass.started = self.clock(ranks.device)
        return training_metrics(every_rank)

    def _pass_rows(self, ranks: Ranks, batch: dict, shuffle: torch.Tensor, strategy: Strategy,
                   steps_per_generation: int, gradient_accumulation_steps: int) -> PassRows:
        """What `strategy.plan` sees of this generation batch: this rank's rows, or every rank's when the strategy
        may move rows between ranks (only models that ignore left padding may move rows: a move re-pads a prompt)."""
        settings, spg, ga = self.settings, steps_per_generation, gradient_accumulation_steps
        steps = optimizer_steps(shuffle.tolist(), spg, ga)
        columns = torch.stack([batch["completion_mask"].sum(1).cpu(), batch["prompt_mask"].sum(1).cpu(),
                               torch.tensor(steps), prompt_groups(batch["prompt_ids"], batch["prompt_mask"], 0).cpu()])
        world = ranks.num_processes if strategy.moves_rows and settings.balance_ranks else 1
        world = world if self.left_padding_free else 1
        if world > 1:
            columns = ranks.gather(columns.T.to(ranks.device)).T.cpu()
        completion, prompt, steps, groups = columns.tolist()
        return PassRows(completion, prompt, steps, groups, shuffle.tolist(), world,
                        ranks.process_index if world > 1 else 0, spg, ga, settings.attention_alpha,
                        settings.partition_method)

    def end_pass(self, ranks: Ranks) -> tuple[dict[str, float], str | None]:
        """Stop the current pass's clock (the slowest rank's seconds) and let the tuner count it. Returns what to log
        and, when the tuner's choice changed, a line saying so."""
        loss_pass, tuner = self.current, self.tuner
        seconds = self.clock(ranks.device) - loss_pass.started
        seconds = ranks.gather(torch.tensor([seconds], device=ranks.device)).max().item()
        # per 1k tokens of stock's work on this batch: stock's passes measure its rate whatever the batch's padding,
        # and another strategy's its share of stock's time, so passes over different batches compare like with like
        per_ktok = seconds / max(loss_pass.stock_tokens / 1000.0, 1e-9)
        exploring = not tuner.decided  # this pass measured (or warmed up) a candidate, before any choice
        changed = tuner.record(loss_pass.strategy, per_ktok)
        ratio = tuner.ratio_vs_stock()
        metrics = ({f"autotune/{loss_pass.strategy}_s_per_ktok": per_ktok}
                   | named("autotune/strategy", STRATEGIES, loss_pass.strategy)
                   | {"autotune/exploring": float(exploring), "autotune/pass": float(tuner.passes),
                      "autotune/passes_to_measure": float(tuner.passes_to_measure)}
                   | (named("autotune/choice", STRATEGIES, tuner.choice) if tuner.decided else {})
                   | ({"autotune/ratio_vs_stock": ratio} if ratio is not None and tuner.decided else {}))
        if not changed:
            return metrics, None
        faster = f", {ratio:.2f}× faster than stock on this device" if ratio is not None else ""
        return metrics, (f"rl-lenbalance: training plan: {tuner.choice}{faster}, "
                         f"{tuner.passes - tuner.warmup} passes measured.")

    @staticmethod
    def clock(device: torch.device) -> float:
        """The host clock once `device` has finished its queued work: the pass's edges and the loss phase's
        seconds read this one clock."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()


def absolute_positions(model: torch.nn.Module) -> bool:
    """True when the decoder adds learned absolute position embeddings (GPT-2's `wpe`, OPT's): the trainer passes
    no position ids, so a row's left padding shifts its positions and changes its outputs."""
    tokens = model.get_input_embeddings()
    return any(isinstance(m, torch.nn.Embedding) and m is not tokens for m in model.get_decoder().modules())
