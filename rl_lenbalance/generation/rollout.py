"""One rollout round, framework-free: generation waves, the probe, re-bucketing across ranks and continuation.

    generate → capture → predict → schedule → (train) → online update

`run_rollout` decodes a rank's prompts through a `Backend` (how to run the policy and reach the other ranks; a
trainer adapter binds it) under the engine's capture hooks, and returns the completions in the prompts' order with
the round's `RolloutStats`. Every scheduling decision comes from `schedule/`; the predictions from the engine.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..ledger import GenerationLedger
from ..schedule import admission_order, balance_rows, padded_tokens, rebucket, waves_by_length
from .capture import CaptureResult, StreamState
from .decode import left_pad
from .engine import LenBalanceEngine, Wave


class Decode(Protocol):
    """Generate completions for unpadded `prompts` under `captured`'s hooks (None: no capture), as the trainer would.

    `compact`: finished rows may leave the batch. `prefixes`: tokens each row already generated (a continuation).
    `max_steps`: stop after this many tokens (a probe). Returns each row's generated ids, eos included.
    """

    def __call__(self, prompts: list[list[int]], captured: CaptureResult | None, *, compact: bool,
                 prefixes: list[list[int]] | None = None, max_steps: int | None = None) -> list[list[int]]: ...


Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]  # (input_ids, attention_mask, position_ids)
Submit = Callable[[list[list[int]]], tuple[list[list[int]], list | None]]  # prompts -> completions, logprobs


@dataclass
class Backend:
    """How a rollout runs the policy and reaches the other ranks."""

    decode: Decode
    forward: Forward  # one no-grad forward of the policy, read by the live hooks (prompt prefill, replay)
    gather: Callable[[list], list]  # every rank's list, concatenated in rank order (`lambda x: x` on one rank)
    rank: int = 0
    world: int = 1
    submit: Submit | None = None  # a backend that schedules requests itself (continuous batching, vLLM)


@dataclass
class RolloutSettings:
    """What this round does (the adapter decides from the config, the generation config and the engine's health)."""

    eos_token_ids: Sequence[int]
    max_completion_length: int
    compact: bool = False  # finished rows leave the batch
    rebucket: bool = False  # after a probe of `probe_tokens`, regroup every rank's running rows by predicted length
    wave_size: int | None = None  # rows per generate call (None: all at once)
    probe_tokens: int = 32
    partition_method: str = "best"
    admit_by_prediction: bool = False  # `run_admitted`: order (and balance) requests by predicted length
    group_size: int = 1  # `run_admitted`: rows submitted and moved together (a backend generating a group at once)
    balance_ranks: bool = False  # `run_admitted`: deal rows to ranks by predicted work before generating
    learn: bool = True  # `run_admitted`: replay the round's features for the head (False: over the overhead budget)


@dataclass
class RolloutStats:
    """What a round did, for the online update and the ledger."""

    waves: list[Wave] = field(default_factory=list)
    lengths: dict[int, int] = field(default_factory=dict)  # final length of every row id in `waves`
    own_ids: list[int] = field(default_factory=list)  # this rank's row ids, in the prompts' order
    rows_moved_in: int = 0
    reprefill_tokens: int = 0
    prefill_seconds: float = 0.0  # prompt-length prediction before the waves, and replayed features
    admitted: list[int] = field(default_factory=list)  # `run_admitted`: lengths of the rows generated here
    seconds: float = 0.0

    def ledger(self, completions: list[list[int]]) -> GenerationLedger:
        """This rank's ledger of the round (`completions`: its own rows)."""
        lengths = [len(c) for c in completions]
        return GenerationLedger(
            decode_slots=sum(w.capture.slots for w in self.waves) + sum(self.admitted),  # a scheduler pads nothing
            decode_slots_stock=sum(lengths) if self.admitted else padded_tokens(lengths, [range(len(lengths))]),
            decode_steps=sum(w.capture.forwards for w in self.waves) + max(self.admitted, default=0),
            decode_steps_stock=max(lengths, default=0),
            real_tokens=sum(lengths), seconds=self.seconds,
            hook_seconds=sum(w.capture.seconds for w in self.waves) + self.prefill_seconds,
            reprefill_tokens=self.reprefill_tokens, rows_moved_in=self.rows_moved_in,
        )


def uncaptured_ledger(completions: list[list[int]], compact: bool, seconds: float) -> GenerationLedger:
    """This rank's ledger of a round decoded without hooks: stock's one call, or the compacting loop, where each row
    leaves the batch once it finished (one decode slot per generated token)."""
    lengths = [len(c) for c in completions]
    stock = padded_tokens(lengths, [range(len(lengths))])
    return GenerationLedger(decode_slots=sum(lengths) if compact else stock, decode_slots_stock=stock,
                            decode_steps=max(lengths, default=0), decode_steps_stock=max(lengths, default=0),
                            real_tokens=sum(lengths), seconds=seconds, hook_seconds=0.0, reprefill_tokens=0,
                            rows_moved_in=0)


def run_rollout(prompts: list[list[int]], backend: Backend, engine: LenBalanceEngine,
                settings: RolloutSettings) -> tuple[list[list[int]], RolloutStats]:
    """Decode one completion per prompt (this rank's rows) in waves; with `settings.rebucket`, the waves stop after
    a probe and every rank's running rows are regrouped and continued. Completions come back in `prompts`' order."""
    start = time.perf_counter()
    offset = backend.rank * len(prompts)  # row ids are unique across ranks
    stats = RolloutStats(own_ids=[offset + i for i in range(len(prompts))])
    completions: list[list[int]] = [[] for _ in prompts]
    running: list[dict] = []
    probe = settings.probe_tokens + 1 if settings.rebucket else None  # decode steps before regrouping
    for rows in _plan_waves(prompts, backend, engine, settings.wave_size, stats):
        wave_prompts = [prompts[i] for i in rows]
        with engine.capture.capture(wave_prompts) as captured:
            ids = backend.decode(wave_prompts, captured, compact=settings.compact, max_steps=probe)
        stats.waves.append(Wave([offset + i for i in rows], captured))
        for row, completion in zip(rows, ids, strict=True):
            completions[row] = completion
        if settings.rebucket:
            running += _running_rows([offset + i for i in rows], wave_prompts, ids, captured, engine, settings)
    stats.lengths = {offset + row: len(c) for row, c in enumerate(completions)}
    if settings.rebucket:
        for row, completion in _continue(running, len(prompts), backend, engine, settings, stats).items():
            stats.lengths[row] = len(completion)
            if 0 <= row - offset < len(prompts):
                completions[row - offset] = completion
    stats.seconds = time.perf_counter() - start
    return completions, stats


def run_admitted(prompts: list[list[int]], backend: Backend, engine: LenBalanceEngine, settings: RolloutSettings
                 ) -> tuple[list[list[int]], list | None, RolloutStats]:
    """One round through a backend that schedules requests itself (`backend.submit`): with
    `settings.admit_by_prediction`, predict each prompt's length (one prefill over the distinct prompts), deal rows
    to ranks by predicted work (`balance_ranks`) and submit each rank's rows longest first; completions and the
    backend's logprobs come back to the rows they belong to. The head learns from features replayed by one forward
    over prompt + completion (`GenerationCapture.replay`), since the backend's own passes cannot be hooked."""
    start = time.perf_counter()
    offset = backend.rank * len(prompts)
    stats = RolloutStats(own_ids=[offset + i for i in range(len(prompts))])
    rows = [(offset + i, prompt) for i, prompt in enumerate(prompts)]
    order = list(range(len(rows)))
    balanced = settings.admit_by_prediction and settings.balance_ranks and backend.world > 1  # rows may move
    if settings.admit_by_prediction:
        predicted = _predict_prompt_lengths(prompts, backend, engine)
        if balanced:
            everyone = backend.gather([(row, prompt, p) for (row, prompt), p in zip(rows, predicted, strict=True)])
            plan = balance_rows([p for _, _, p in everyone], backend.world, settings.group_size,
                                settings.partition_method)
            rows, predicted = ([everyone[i][:2] for i in plan[backend.rank]],
                               [everyone[i][2] for i in plan[backend.rank]])
            stats.rows_moved_in = sum(row // len(prompts) != backend.rank for row, _ in rows)
        order = admission_order(predicted, settings.group_size)
        stats.prefill_seconds = time.perf_counter() - start
    submitted = [rows[i] for i in order]
    ids, logprobs = backend.submit([prompt for _, prompt in submitted])
    stats.admitted = [len(c) for c in ids]
    done = {row: (c, None if logprobs is None else logprobs[n]) for n, ((row, _), c) in enumerate(zip(submitted, ids))}
    if balanced:
        done = {row: out for part in backend.gather([done]) for row, out in part.items()}
    completions = [done[row][0] for row in stats.own_ids]
    own_logprobs = None if logprobs is None else [done[row][1] for row in stats.own_ids]
    if settings.learn:
        replay_start = time.perf_counter()
        stats.waves = [Wave(stats.own_ids, engine.capture.replay(prompts, completions, backend.forward))]
        stats.prefill_seconds += time.perf_counter() - replay_start
    stats.lengths = {row: len(c) for row, c in zip(stats.own_ids, completions, strict=True)}
    stats.seconds = time.perf_counter() - start
    return completions, own_logprobs, stats


def _plan_waves(prompts: list[list[int]], backend: Backend, engine: LenBalanceEngine, wave_size: int | None,
                stats: RolloutStats) -> list[list[int]]:
    """Rows of each generate call: all at once (stock), or waves longest-predicted first (stock order while the
    head is untrained or unhealthy)."""
    rows = list(range(len(prompts)))
    if wave_size is None or wave_size >= len(rows):
        return [rows]
    if not engine.healthy or engine.rounds == 0:
        return [rows[i : i + wave_size] for i in range(0, len(rows), wave_size)]
    start = time.perf_counter()
    predicted = _predict_prompt_lengths(prompts, backend, engine)
    stats.prefill_seconds = time.perf_counter() - start
    return waves_by_length(predicted, wave_size)


def _predict_prompt_lengths(prompts: list[list[int]], backend: Backend, engine: LenBalanceEngine) -> list[float]:
    """EGTP prompt-only length of each row, from one prefill over the distinct prompts (or the estimate with the
    lowest recent live error, `LenBalanceEngine.read`)."""
    distinct = [list(p) for p in dict.fromkeys(tuple(p) for p in prompts)]
    with engine.capture.capture(distinct) as captured:
        backend.forward(*left_pad(distinct, 0, engine.capture.device))  # pad id: masked, any will do
    read = engine.read(captured.predicted_total(0), captured.prompt_keys, 0, [()] * len(distinct))
    by_prompt = dict(zip(map(tuple, distinct), read.tolist(), strict=True))
    return [by_prompt[tuple(p)] for p in prompts]


def _running_rows(ids: list[int], prompts: list[list[int]], completions: list[list[int]], captured: CaptureResult,
                  engine: LenBalanceEngine, settings: RolloutSettings) -> list[dict]:
    """The rows a probe left running, each with what any wave on any rank needs to continue it."""
    running = [j for j, c in enumerate(completions)
               if c[-1] not in settings.eos_token_ids and len(c) < settings.max_completion_length]
    if not running:
        return []
    position = {row: p for p, row in enumerate(captured.rows.tolist())}
    state = captured.state.rows([position[j] for j in running])
    keys = captured.prompt_keys  # a sibling's length so far: it ended if that is <= the state's step
    siblings = [[len(c) for k, c in enumerate(completions) if k != j and keys[k] == keys[j]] for j in running]
    predicted = engine.predict_remaining(state, siblings)
    probed = torch.full((len(completions),), float("nan"))
    probed[running] = predicted
    captured.probe = (state.steps, probed)  # the head's, scored after the round (`LenBalanceEngine.score_live`)
    remaining = engine.read(predicted, state.keys, state.steps, siblings)
    if not torch.isfinite(remaining).all():
        warnings.warn("rl-lenbalance: the length head predicted non-finite lengths; those rows are re-bucketed as if "
                      "they had the maximum length left.")
        longest = float(settings.max_completion_length)
        remaining = remaining.nan_to_num(longest, posinf=longest)
    return [dict(id=ids[j], prompt=prompts[j], prefix=completions[j], state=state.rows([n]),
                 remaining=float(remaining[n])) for n, j in enumerate(running)]


def _continue(running: list[dict], batch_size: int, backend: Backend, engine: LenBalanceEngine,
              settings: RolloutSettings, stats: RolloutStats) -> dict[int, list[int]]:
    """Regroup every rank's running rows into waves by predicted remaining length, dealt to ranks; decode them to
    the end (their waves join `stats.waves`); return every continued row's completion (all ranks'), by row id."""
    everyone = backend.gather(running) if backend.world > 1 else running
    origin = [row["id"] // batch_size for row in everyone]
    plan = rebucket([row["remaining"] for row in everyone], origin, backend.world, settings.wave_size or batch_size,
                    settings.compact, settings.partition_method)
    mine = plan[backend.rank]
    done: dict[int, list[int]] = {}
    for wave in mine:
        group = [everyone[i] for i in wave]
        prompts = [row["prompt"] for row in group]
        resume = StreamState.cat([row["state"] for row in group], engine.capture.device)
        with engine.capture.capture(prompts, resume=resume) as captured:
            ids = backend.decode(prompts, captured, compact=settings.compact, prefixes=[row["prefix"] for row in group])
        stats.waves.append(Wave([row["id"] for row in group], captured))
        done.update({row["id"]: completion for row, completion in zip(group, ids, strict=True)})
    stats.reprefill_tokens = sum(len(everyone[i]["prompt"]) + len(everyone[i]["prefix"]) for w in mine for i in w)
    stats.rows_moved_in = sum(origin[i] != backend.rank for w in mine for i in w)
    if backend.world == 1:
        return done
    return {row: completion for part in backend.gather([done]) for row, completion in part.items()}
