"""The run-time choice of a loss-phase strategy, as `torch.backends.cudnn.benchmark` chooses kernels: measure each
exact candidate on the run's own passes, keep the fastest, re-check now and then. Pure: timings in, choice out."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

STOCK = "stock"
AUTO = "auto"  # a setting the tuner decides by measurement
OFF = "off"  # a plan left to the trainer: its own micro-batches, untouched


def spread(samples: Sequence[float]) -> float:
    """Relative noise of timings: half their range over their median (0 for fewer than two)."""
    if len(samples) < 2:
        return 0.0
    return (max(samples) - min(samples)) / (2 * statistics.median(samples))


def decide(timings: Mapping[str, Sequence[float]], current: str, margin: float) -> str:
    """The strategy to keep, given each one's timings (seconds per 1k tokens of stock's work, lower is better).

    A strategy other than stock wins only if its median beats stock's by more than `margin` and by more than the
    noise of both; the current choice is kept unless the fastest winner beats it by the same rule, and dropped when
    it no longer beats stock."""
    median = {name: statistics.median(t) for name, t in timings.items() if t}

    def beats(a: str, b: str) -> bool:
        gain = median[b] / median[a] - 1.0
        return gain > margin and gain > max(spread(timings[a]), spread(timings[b]))

    winners = [name for name in median if name == STOCK or (STOCK in median and beats(name, STOCK))]
    if not winners:
        return STOCK
    best = min(winners, key=median.__getitem__)
    if current in winners and current != best and not beats(best, current):
        return current
    return best


@dataclass
class Autotuner:
    """Which strategy each pass over a generation batch uses, and what the measurements chose.

    Passes `0 .. warmup-1` run `first`, untimed (allocators and kernels warm up). Then the candidates take turns, in
    an order that reverses every round (ABC, CBA, ...), until each has `samples` timings; from then on the choice
    runs, and every `recheck_every`-th pass one other candidate (in turn) runs once, so a drift in lengths can change
    the choice. Only the latest `window` timings of each strategy count."""

    candidates: list[str]
    first: str = STOCK  # the warm-up passes' strategy (the least padded one: no measurement exists yet)
    warmup: int = 1
    samples: int = 2
    margin: float = 0.03
    recheck_every: int = 20
    window: int = 5
    choice: str = STOCK
    passes: int = 0
    timings: dict[str, list[float]] = field(default_factory=dict)
    _rechecks: int = 0

    def __post_init__(self) -> None:
        if len(self.candidates) == 1:  # a pinned strategy: nothing to choose
            self.choice = self.candidates[0]

    def next(self) -> str:
        """The strategy of the next pass."""
        measured = self.passes - self.warmup
        if len(self.candidates) == 1:
            return self.candidates[0]
        if measured < 0:
            return self.first
        rounds, turn = divmod(measured, len(self.candidates))
        if rounds < self.samples:
            order = self.candidates if rounds % 2 == 0 else self.candidates[::-1]
            return order[turn]
        if self.recheck_every and (measured - self.samples * len(self.candidates) + 1) % self.recheck_every == 0:
            others = [c for c in self.candidates if c != self.choice]
            return others[self._rechecks % len(others)]
        return self.choice

    def record(self, strategy: str, seconds_per_ktok: float | None) -> bool:
        """Count one pass of `strategy` (its time, or None for an untimed warm-up pass); True when the choice
        changed."""
        self.passes += 1
        if seconds_per_ktok is None or self.passes <= self.warmup:
            return False
        kept = self.timings.setdefault(strategy, [])
        kept.append(seconds_per_ktok)
        del kept[:-self.window]
        if strategy != self.choice and self.passes - self.warmup > self.samples * len(self.candidates):
            self._rechecks += 1
        if len(self.candidates) == 1 or self.passes - self.warmup < self.samples * len(self.candidates):
            return False  # pinned, or still measuring every candidate
        before, self.choice = self.choice, decide(self.timings, self.choice, self.margin)
        return self.choice != before

    def state_dict(self) -> dict:
        """What the passes so far measured and decided (plain values, JSON-ready), for a resumed run to go on from."""
        return {"candidates": list(self.candidates), "passes": self.passes, "choice": self.choice,
                "timings": {name: list(t) for name, t in self.timings.items()}, "rechecks": self._rechecks}

    def load_state_dict(self, state: Mapping) -> None:
        """Go on from `state_dict()`: the next pass and every later choice are those of the run that saved it (given
        the same timings). ValueError when it was saved over other candidates."""
        if list(state["candidates"]) != self.candidates:
            raise ValueError(f"the saved tuner chose among {list(state['candidates'])}, this run among "
                             f"{self.candidates}")
        self.passes, self.choice, self._rechecks = int(state["passes"]), str(state["choice"]), int(state["rechecks"])
        self.timings = {name: [float(x) for x in t] for name, t in state["timings"].items()}

    @property
    def decided(self) -> bool:
        """Whether `choice` comes from measurements (or is the only candidate)."""
        return len(self.candidates) == 1 or self.passes - self.warmup >= self.samples * len(self.candidates)

    @property
    def passes_to_measure(self) -> int:
        """The passes (warm-up included) before the first choice: 0 for a single candidate."""
        return 0 if len(self.candidates) == 1 else self.warmup + self.samples * len(self.candidates)

    def ratio_vs_stock(self) -> float | None:
        """Stock's median time over the choice's (>1: the choice is faster), once both were measured."""
        if not self.timings.get(STOCK) or not self.timings.get(self.choice):
            return None
        return statistics.median(self.timings[STOCK]) / statistics.median(self.timings[self.choice])
