"""The predictor's life in a training loop, framework-free: capture during generation, honest online error,
online training on the finished rollouts, fallback when it fails. TRL adapters call this; it never imports TRL."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ..config import LenBalanceConfig
from ..predictor import (
    CONTEXT_SIZE,
    HeadConfig,
    LengthHistory,
    NaiveLengthBaseline,
    OnlineTrainer,
    PLPHead,
    context_vector,
    feature_size,
    kendall_tau,
    plp_features,
)
from ..predictor.context import CANDIDATES, ESTIMATES
from ..predictor.head import CONFIG_NAME, WEIGHTS_NAME
from .capture import CaptureResult, GenerationCapture, StreamState, record_steps

STATE_NAME = "engine_state.pt"  # beside the head's files: its optimizer, replay buffer, baseline and health
Gather = Callable[[torch.Tensor], torch.Tensor]  # this rank's rows -> every rank's rows, in rank order

PLP_REPORT_STEP = 32  # the PLP error is reported after this many observed tokens (the paper's t = 32)
SELECTION_ROUNDS = 10  # the last rounds of live error that choose among them (3 chased noise: round to round, the
# best estimate of the last 3 was often the worst of the next; docs/benchmarks/README.md, predictor_online_cpu.json)


def head_config(config: LenBalanceConfig, hidden_size: int, max_length: int) -> HeadConfig:
    """The head this run's settings ask for."""
    return HeadConfig(hidden_size, max_length, config.num_bins, config.ce_weight, config.dropout, config.pooling,
                      config.feature_layer, CONTEXT_SIZE if config.context_features else 0)


def new_trainer(head: PLPHead, config: LenBalanceConfig, seed: int) -> OnlineTrainer:
    """The online trainer of `head` with this run's settings."""
    return OnlineTrainer(head, config.predictor_lr, config.replay_buffer_size, config.predictor_batch_size,
                         config.predictor_steps_per_round, seed)


def check_head(head: HeadConfig, config: LenBalanceConfig, hidden_size: int, max_length: int, path: str) -> None:
    """Refuse a saved head whose contract differs from this run's: it would silently read other features."""
    wanted = head_config(config, hidden_size, max_length)
    names = ("hidden_size", "max_length", "pooling", "feature_layer", "extra_features", "context_size")
    expected = {name: getattr(wanted, name) for name in names}
    fixes = {"hidden_size": "point lenbalance.predictor_path at a head trained on this model",
             "max_length": "set max_completion_length to the head's, or train a new head",
             "pooling": "set lenbalance.pooling to the head's",
             "feature_layer": "set lenbalance.feature_layer to the head's",
             "extra_features": "the head reads feature columns the trainer does not compute (a benchmark variant): "
                               "train a new head",
             "context_size": ("the head reads another set of context features (saved by another rl-lenbalance "
                              "version): train a new head" if head.context_size and wanted.context_size else
                              "set lenbalance.context_features to match the head (it was saved "
                              + ("with" if head.context_size else "without") + " context features)")}
    wrong = [name for name, value in expected.items() if getattr(head, name) != value]
    if wrong:
        raise ValueError(
            f"The length head at lenbalance.predictor_path={path!r} was trained with "
            + ", ".join(f"{name}={getattr(head, name)!r}" for name in wrong) + "; this run has "
            + ", ".join(f"{name}={expected[name]!r}" for name in wrong) + ". Fix: "
            + "; ".join(fixes[name] for name in wrong) + " (or unset lenbalance.predictor_path to train from scratch)."
        )


@dataclass
class TrainingPairs:
    """A round's training pairs. Per entry (a row of a wave): its PLP features and remaining length at t=0 and t=32
    (`y0`/`y32` = -1 where the row ended earlier), its prompt's key, its final length and its first wave. Per sample
    (`samples_per_sequence` slots per entry): a (feature, remaining length, step) triple, `y` = -1 where unused."""

    z0: torch.Tensor  # (E, F)
    y0: torch.Tensor  # (E,)
    z32: torch.Tensor  # (E, F)
    y32: torch.Tensor  # (E,)
    row: torch.Tensor  # (E,) the row's id (unique across ranks; a re-bucketed row has an entry per wave), -1: none
    prompt: torch.Tensor  # (E,) int64 key of the row's prompt (`CaptureResult.prompt_keys`)
    length: torch.Tensor  # (E,) final length of the row
    wave: torch.Tensor  # (E,) id of the generate call that started the row (its smallest row id); -1: a continuation
    z: torch.Tensor  # (E * S, F)
    y: torch.Tensor  # (E * S,)
    step: torch.Tensor  # (E * S,) decode step of each sample

    @classmethod
    def empty(cls, entries: int, samples: int, width: int) -> TrainingPairs:
        """`entries` invalid entries of `samples` invalid samples each."""
        return cls(z0=torch.zeros(entries, width), y0=torch.full((entries,), -1.0), z32=torch.zeros(entries, width),
                   y32=torch.full((entries,), -1.0), row=torch.full((entries,), -1, dtype=torch.long),
                   prompt=torch.zeros(entries, dtype=torch.long),
                   length=torch.zeros(entries, dtype=torch.long), wave=torch.full((entries,), -1, dtype=torch.long),
                   z=torch.zeros(entries * samples, width),
                   y=torch.full((entries * samples,), -1.0),
                   step=torch.full((entries * samples,), -1, dtype=torch.long))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TrainingPairs:
        """`fn` applied to every tensor (e.g. a gather over ranks)."""
        return TrainingPairs(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})


def lowest_mean_error(rounds: Sequence[Sequence[float]]) -> int:
    """The index of the candidate (a column of `rounds`, one row per round) with the lowest mean error; NaNs are
    skipped, and a candidate never scored is never chosen."""
    return int(torch.tensor(rounds, dtype=torch.float64).nanmean(0).nan_to_num(float("inf")).argmin())


def group_median_targets(pairs: TrainingPairs) -> torch.Tensor:
    """`pairs.y` with each t=0 sample's target set to the median final length of its prompt's rows in the round
    (`LenBalanceConfig.static_target='group_median'`); every other sample keeps its own remaining length."""
    final = {row: (prompt, length) for row, prompt, length  # a re-bucketed row's entries count once
             in zip(pairs.row.tolist(), pairs.prompt.tolist(), pairs.length.tolist(), strict=True) if row >= 0}
    by_prompt: dict[int, list[int]] = {}
    for prompt, length in final.values():
        by_prompt.setdefault(prompt, []).append(length)
    median = {prompt: torch.tensor(lengths, dtype=torch.float32).quantile(0.5).item()
              for prompt, lengths in by_prompt.items()}
    prompts = pairs.prompt.repeat_interleave(len(pairs.y) // len(pairs.row)).tolist()
    static = ((pairs.step == 0) & (pairs.y >= 0)).tolist()
    return torch.tensor([median[p] if at_zero else y for p, at_zero, y in zip(prompts, static, pairs.y.tolist())])


@dataclass
class Wave:
    """One generate call: the rows it ran (ids unique across ranks) and what its hooks captured."""

    rows: list[int]
    capture: CaptureResult


@contextmanager
def private_rng(seed: int) -> Iterator[None]:
    """Run predictor work on its own RNG stream so the policy's sampling sees exactly the RNG stock TRL sees."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class LenBalanceEngine:
    """Owns the head, its online trainer and naive baseline, and turns generation rounds into metrics."""

    def __init__(self, model: nn.Module, config: LenBalanceConfig, max_length: int, seed: int = 0) -> None:
        hidden = model.config.get_text_config().hidden_size
        device = next(model.parameters()).device
        with private_rng(seed):
            if config.predictor_path:
                head = PLPHead.from_pretrained(config.predictor_path)
                check_head(head.config, config, hidden, max_length, config.predictor_path)
            else:
                head = PLPHead(head_config(config, hidden, max_length))
        self.head = head.to(device).eval()
        self.config, self.max_length, self.seed = config, max_length, seed
        self.capture = GenerationCapture(model, self.predict, config, max_length, self.live_input)
        self.trainer = new_trainer(self.head, config, seed)
        self.baseline = NaiveLengthBaseline()
        self.history = LengthHistory()
        self.rounds = 0
        self.live_errors: dict[str, deque[list[float]]] = {}  # label -> recent rounds' live MAE per candidate
        self.rounds_worse_than_naive = 0
        self.fallbacks = 0
        self.healthy = True
        self._fallback_round = -1  # the round of the last fallback: one event counts once, whatever its symptoms
        self._steps = record_steps(max_length, config.record_every)
        if config.predictor_path and not self.head_is_finite():
            warnings.warn(f"rl-lenbalance: the predictor at lenbalance.predictor_path={config.predictor_path!r} holds "
                          "non-finite values (NaN/inf); re-initialising the head and training it from scratch.")
            self._reinitialise()

    def training_pairs(self, waves: list[Wave], lengths: Mapping[int, int]) -> TrainingPairs:
        """Fixed-shape tensors (an entry per row of each wave; invalid entries have target -1) of the PLP features at
        t=0 and t=32, and `samples_per_sequence` sampled (feature, remaining length) pairs per row.

        A re-bucketed row is split over two waves, maybe on two ranks (`lengths` maps row id → final length). The
        steps of a row are drawn from a generator seeded by its id, so each wave keeps the draws it holds and the
        row yields the same pairs as if one call had generated it.
        """
        entries, width = sum(len(w.rows) for w in waves), feature_size(self.head.config.hidden_size)
        samples = self.config.samples_per_sequence
        out = TrainingPairs.empty(entries, samples, width)
        entry = 0
        for wave in waves:
            recorded = {step: z.float().cpu() for step, z in wave.capture.recorded.items()}  # one copy per step
            first = min(wave.rows) if 0 in wave.capture.prediction_steps else -1  # a continuation starts past 0
            for j, row in enumerate(wave.rows):
                length = lengths[row]
                out.row[entry], out.prompt[entry], out.length[entry] = row, wave.capture.prompt_keys[j], length
                out.wave[entry] = first
                steps = [s for s in self._steps if s < length]
                for z, y, step in ((out.z0, out.y0, 0), (out.z32, out.y32, PLP_REPORT_STEP)):
                    if step in steps and step in recorded:
                        z[entry], y[entry] = recorded[step][j], float(length - step)
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rounds * 100_003 + row)
                picks = [steps[p] for p in torch.randperm(len(steps), generator=generator)[:samples].tolist()]
                for k, step in enumerate(s for s in picks if s in recorded):
                    out.z[entry * samples + k] = recorded[step][j]
                    out.y[entry * samples + k] = float(length - step)
                    out.step[entry * samples + k] = step
                entry += 1
        return out

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        """The head's predicted remaining length (float32, on the inputs' device) of each row of head inputs."""
        return self.head.predict(inputs.to(self.head.edges.device)).to(inputs.device, torch.float32)

    def context(self, keys: Sequence[int], steps: Sequence[int], siblings: Sequence[Sequence[int]]) -> torch.Tensor:
        """(N, CONTEXT_SIZE): what is visible of row i at step `steps[i]`: its prompt's (`keys[i]`) past lengths and
        the running estimates, both from rounds before this one, and its siblings, the other rows of its prompt in the
        generate call that started it (same rank, decoded together), given by their lengths (`siblings[i]`): those
        <= the step had ended by then, larger ones were still running. Other rows of the prompt are not visible."""
        baseline: dict[int, tuple[float | None, float | None]] = {}  # step -> (naive, median)
        rows = []
        for key, step, others in zip(keys, steps, siblings, strict=True):
            if step not in baseline:
                baseline[step] = self.baseline.predict_remaining(step), self.baseline.predict_median(step)
            naive, median = baseline[step]
            rows.append(context_vector(self.history, naive, key, step, others, self.max_length, median))
        return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), CONTEXT_SIZE)

    def head_input(self, features: torch.Tensor, keys: Sequence[int], steps: Sequence[int],
                   siblings: Sequence[Sequence[int]]) -> torch.Tensor:
        """The head's input for rows at these steps, the one definition used by live prediction, training and
        scoring: the PLP features (then any extra features), then `context(keys, steps, siblings)` when the head reads
        context (`HeadConfig.context_size`); rounded to float16 as the replay buffer stores it, so a live prediction
        and the training pair of the same row and step are the same vector."""
        if self.head.config.context_size:
            features = torch.cat([features.float(), self.context(keys, steps, siblings).to(features.device)], 1)
        return features.to(torch.float16).float()

    def live_input(self, features: torch.Tensor, keys: list[int], step: int) -> torch.Tensor:
        """`head_input` inside the capture's hooks, which see no sibling end: exact at step 0, the prediction the
        scheduler reads there (no row ends before its first token). `predict_every`'s inspection predictions past
        step 0 count every sibling as running; the probe's prediction (`predict_remaining`) sees them."""
        return self.head_input(features, keys, [step] * len(keys), [()] * len(keys))

    def predict_remaining(self, state: StreamState, siblings: Sequence[Sequence[int]]) -> torch.Tensor:
        """PLP: the remaining length of each row of `state`, after the tokens it has seen (on the CPU); `siblings`:
        per row, the lengths so far of the other rows of its prompt in its generate call (`context`)."""
        z = plp_features(state.prompt, state.pool, state.steps, self.max_length)
        return self.predict(self.head_input(z, state.keys, [state.steps] * len(state.keys), siblings)).cpu()

    def chosen(self, step: int) -> str:
        """The candidate (`CANDIDATES`) the scheduler acts on at `step`: the lowest mean live MAE over the last
        `SELECTION_ROUNDS` rounds scored at that step (`score_live`); the head before any."""
        rounds = self.live_errors.get(_label(step))
        return CANDIDATES[lowest_mean_error(list(rounds))] if rounds else "head"

    def read(self, predicted: torch.Tensor, keys: Sequence[int], step: int,
             siblings: Sequence[Sequence[int]]) -> torch.Tensor:
        """The remaining length the scheduler acts on, for rows whose head predicted `predicted` at `step`: that, or
        the estimate `chosen(step)` computed with the same visibility (`context`)."""
        choice = self.chosen(step)
        if choice == "head":
            return predicted
        estimate = self.context(keys, [step] * len(keys), siblings)[:, ESTIMATES.index(choice)] * self.max_length
        return estimate.to(predicted)

    @staticmethod
    def siblings(pairs: TrainingPairs) -> list[list[int]]:
        """Per entry of `pairs` (every rank's rows): the final lengths of the other rows of its prompt in the generate
        call that started its row (`TrainingPairs.wave`), as `context` reads them; none for an invalid entry."""
        rows, prompts = pairs.row.tolist(), pairs.prompt.tolist()
        first = {row: wave for row, wave in zip(rows, pairs.wave.tolist(), strict=True) if row >= 0 and wave >= 0}
        groups: dict[tuple[int, int], dict[int, int]] = {}
        for row, prompt, length in zip(rows, prompts, pairs.length.tolist(), strict=True):
            if row in first:
                groups.setdefault((first[row], prompt), {})[row] = length
        return [[length for other, length in groups.get((first.get(row, -1), prompt), {}).items() if other != row]
                for row, prompt in zip(rows, prompts, strict=True)]

    def round_inputs(self, pairs: TrainingPairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The head's inputs (`head_input`) of the entries at t=0 and t=32 and of the samples, from the round's rows
        (`pairs` holds every rank's) and the history before this round."""
        return self._round_inputs(pairs, self.siblings(pairs))

    def _round_inputs(self, pairs: TrainingPairs, siblings: list[list[int]]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys, entries = pairs.prompt.tolist(), len(pairs.row)
        samples = len(pairs.y) // entries if entries else 0
        at = [self.head_input(z, keys, [step] * entries, siblings) for z, step in ((pairs.z0, 0),
                                                                                  (pairs.z32, PLP_REPORT_STEP))]
        sampled = self.head_input(pairs.z, [k for k in keys for _ in range(samples)], pairs.step.tolist(),
                                  [s for s in siblings for _ in range(samples)])
        return at[0], at[1], sampled

    def learn_round(self, waves: list[Wave], lengths: Mapping[int, int], own_ids: list[int],
                    gather: Gather) -> tuple[dict[str, float], list[tuple[float, int]]]:
        """The online update after a round: every rank's training pairs and lengths (`gather` concatenates the
        ranks' rows in rank order; ranks may hold different counts, padded with -1), the live predictions scored
        (`score_live`), then the replay scored and learned (`learn`).
        Returns the metrics and the (predicted at t=0, actual) length of every rank's own rows (`own_ids`)."""
        pairs = self.training_pairs(waves, lengths).map(gather)
        live = torch.full((len(own_ids), 3), float("nan"))  # per own row: predicted at t=0, probe step, predicted there
        position = {row: i for i, row in enumerate(own_ids)}
        for wave in waves:
            if 0 in wave.capture.prediction_steps:  # a probe or plain wave: its rows are this rank's own
                rows = [position[row] for row in wave.rows]
                live[rows, 0] = wave.capture.predicted_total(0).float().cpu()
                if wave.capture.probe is not None:
                    step, predicted = wave.capture.probe
                    live[rows, 1], live[rows, 2] = float(step), predicted.float().cpu()
        ids, live = gather(torch.tensor(own_ids)), gather(live)
        actual = gather(torch.tensor([lengths[row] for row in own_ids]))
        table = list(zip(live[:, 0].tolist(), actual.tolist(), strict=True))
        metrics = self.score_live(ids, live, actual, pairs)
        return metrics | self.learn(pairs, actual), table

    def score_live(self, rows: torch.Tensor, live: torch.Tensor, lengths: torch.Tensor,
                   pairs: TrainingPairs) -> dict[str, float]:
        """Score the predictions the scheduler read against the lengths that followed, beside the naive / history /
        sibling / median estimates with the same visibility (`context` at the same row and step): per row id (`rows`,
        -1: padding) its predicted remaining length at t=0, the probe step and its prediction there (`live`: (N, 3),
        NaN where none was made) and its final length; `pairs` (every rank's) gives each row's prompt and siblings.
        Keys `predictor/live_{mae,kendall}_static` and `_plp<probe step>`; `predictor/used_<label>`, the index in
        `CANDIDATES` of the estimate the scheduler acted on (`chosen`), and its MAE `predictor/live_mae_used_<label>`.
        From the second round on, the errors join those `chosen` reads. Call before `learn` updates the history."""
        keys = dict(zip(pairs.row.tolist(), pairs.prompt.tolist(), strict=True))
        siblings = dict(zip(pairs.row.tolist(), self.siblings(pairs), strict=True))
        valid = rows >= 0
        made = [("static", 0, valid & live[:, 0].isfinite(), live[:, 0])]
        probed = valid & live[:, 1].isfinite() & live[:, 2].isfinite()
        made += [(_label(step), step, probed & (live[:, 1] == step), live[:, 2])
                 for step in sorted({int(s) for s in live[probed, 1].tolist()})]
        metrics: dict[str, float] = {}
        for label, step, mask, predicted in made:
            if not mask.any():
                continue
            ids = rows[mask].tolist()
            context = self.context([keys[r] for r in ids], [step] * len(ids), [siblings[r] for r in ids])
            scores = self._scores("live_", label, step, predicted[mask], (lengths[mask] - step).float(), context,
                                  kendall=True)
            errors = [scores.get(f"predictor/live_mae_{label}" if name == "head" else
                                 f"predictor/live_mae_{name}_{label}", float("nan")) for name in CANDIDATES]
            used = CANDIDATES.index(self.chosen(step))  # what this round's scheduler acted on
            metrics |= scores | {f"predictor/used_{label}": float(used),
                                 f"predictor/live_mae_used_{label}": errors[used]}
            if self.baseline.predict_remaining(step) is not None:  # not round 1: an untrained head, no estimate yet
                self.live_errors.setdefault(label, deque(maxlen=SELECTION_ROUNDS)).append(errors)
        return metrics

    def _scores(self, prefix: str, label: str, step: int, predicted: torch.Tensor, remaining: torch.Tensor,
                context: torch.Tensor, kendall: bool) -> dict[str, float]:
        """`predictor/{prefix}mae_{label}` of the head's predictions, `..._{estimate}_{label}` of each estimate leading
        `context` (before any history only naive, then half the tokens left) and, with `kendall` and two rows or more,
        `predictor/{prefix}kendall_{label}`."""
        out = {f"predictor/{prefix}mae_{label}": (predicted - remaining).abs().mean().item()}
        history = self.baseline.predict_remaining(step) is not None
        for k, name in enumerate(ESTIMATES):
            if history or name == "naive":
                out[f"predictor/{prefix}mae_{name}_{label}"] = (
                    (context[:, k] * self.max_length - remaining).abs().mean().item())
        if kendall and len(remaining) > 1:
            out[f"predictor/{prefix}kendall_{label}"] = kendall_tau(predicted, remaining)
        return out

    def learn(self, pairs: TrainingPairs, lengths: torch.Tensor) -> dict[str, float]:
        """Replay: score the head and the naive / history / sibling / median estimates on the round's recorded pairs at
        t=0 and t=32 (before the head sees them), then train on them. `pairs` and `lengths` must already hold every
        rank's rows, so every rank trains an identical head. Inputs and estimates see what a live prediction at the
        same row and step sees (`head_input`)."""
        metrics: dict[str, float] = {}
        start = time.perf_counter()
        siblings = self.siblings(pairs)
        x0, x32, x = self._round_inputs(pairs, siblings)
        keys, entries = pairs.prompt.tolist(), len(pairs.row)
        for label, step, inputs, y in (("static", 0, x0, pairs.y0), ("plp32", PLP_REPORT_STEP, x32, pairs.y32)):
            valid = y >= 0
            if not valid.any():
                continue
            context = self.context(keys, [step] * entries, siblings)[valid]
            metrics |= self._scores("", label, step, self.predict(inputs[valid]).cpu(), y[valid], context,
                                    kendall=label != "static")
        self._update_health(metrics)
        targets = group_median_targets(pairs) if self.config.static_target == "group_median" else pairs.y
        valid = targets >= 0
        with private_rng(self.seed + self.rounds):
            loss = self.trainer.observe(x[valid], targets[valid])
        if loss is not None:
            metrics["predictor/loss"] = loss
        if not self.head_is_finite():
            self._fall_back("its weights or bin values became non-finite; re-initialising the head")
            self._reinitialise()
        self.baseline.update(lengths.tolist())
        rows = {row: (prompt, length) for row, prompt, length
                in zip(pairs.row.tolist(), pairs.prompt.tolist(), pairs.length.tolist(), strict=True) if row >= 0}
        self.history.update([p for p, _ in rows.values()], [length for _, length in rows.values()])
        self.rounds += 1
        metrics["predictor/train_s"] = time.perf_counter() - start
        metrics["predictor/skipped_updates"] = float(self.trainer.skipped_updates)
        metrics["predictor/fallbacks"] = float(self.fallbacks)
        metrics["predictor/healthy"] = float(self.healthy)
        return metrics

    def _update_health(self, metrics: dict[str, float]) -> None:
        mae, naive = metrics.get("predictor/mae_static"), metrics.get("predictor/mae_naive_static")
        naive = naive if self.baseline.predict_remaining(0) is not None else None  # judged against history only
        if mae is None:
            return
        if not torch.isfinite(torch.tensor(mae)):
            self._fall_back("its predictions are not finite")
            return
        self.rounds_worse_than_naive = self.rounds_worse_than_naive + 1 if naive is not None and mae > naive else 0
        was_healthy = self.healthy
        self.healthy = self.rounds_worse_than_naive < self.config.fallback_window
        if was_healthy and not self.healthy:
            self._fall_back(
                f"its online MAE was worse than the naive baseline for {self.config.fallback_window} rounds in a row"
            )

    def head_is_finite(self) -> bool:
        """No NaN/inf in the head's parameters nor in its buffers (the bins' read-out values and counts)."""
        return all(torch.isfinite(t).all() for t in (*self.head.parameters(), *self.head.buffers()))

    def _fall_back(self, why: str) -> None:
        self.healthy = False
        if self._fallback_round == self.rounds:  # the same event seen again (e.g. NaN predictions, then NaN weights)
            return
        self._fallback_round = self.rounds
        self.fallbacks += 1
        warnings.warn(
            f"rl-lenbalance: the length predictor is unreliable ({why}); scheduling falls back to stock ordering "
            "of generation and actual-length balancing of training until it recovers (lenbalance/predictor/fallbacks)."
        )

    def _reinitialise(self) -> None:
        with private_rng(self.seed + self.rounds):
            fresh = PLPHead(self.head.config).to(self.head.edges.device)
        self.head.load_state_dict(fresh.state_dict())
        self.trainer = new_trainer(self.head, self.config, self.seed)

    def state_dict(self) -> dict:
        """Everything besides the head's weights needed to resume: its optimizer, the replay buffer and sampling RNG,
        the naive baseline's history and the health counters (tensors and plain values: `torch.load(weights_only=True)`
        reads it back)."""
        return {"optimizer": self.trainer.optimizer.state_dict(), "buffer": self.trainer.buffer.state_dict(),
                "generator": self.trainer.generator.get_state(), "skipped_updates": self.trainer.skipped_updates,
                "baseline": list(self.baseline.lengths), "history": self.history.state_dict(), "rounds": self.rounds,
                "live_errors": {label: list(rounds) for label, rounds in self.live_errors.items()},
                "fallbacks": self.fallbacks,
                "rounds_worse_than_naive": self.rounds_worse_than_naive, "healthy": self.healthy}

    def load_state_dict(self, state: dict, optimizer: bool = True) -> None:
        """Restore `state_dict()` into an engine whose head already holds the saved weights (without `optimizer`,
        the head was not restored: its optimizer state is left fresh). A head holding NaN/inf is re-initialised,
        and an optimizer state holding NaN/inf dropped, each with a warning."""
        if not self.head_is_finite():
            warnings.warn("rl-lenbalance: the restored length predictor holds non-finite values (NaN/inf) in its "
                          "weights or bin values; re-initialising the head (its optimizer state is dropped).")
            self._reinitialise()
        elif not all(torch.isfinite(t).all() for s in state["optimizer"]["state"].values() for t in s.values()):
            warnings.warn("rl-lenbalance: the restored predictor optimizer state holds non-finite values (NaN/inf); "
                          "the head keeps its weights and its optimizer starts fresh.")
        elif optimizer:
            self.trainer.optimizer.load_state_dict(state["optimizer"])
        self.trainer.buffer.load_state_dict(state["buffer"])
        self.trainer.generator.set_state(state["generator"])
        self.trainer.skipped_updates = state["skipped_updates"]
        self.baseline.lengths.clear()
        self.baseline.update(state["baseline"])
        # none in states saved before it
        self.history.load_state_dict(state.get("history", {"rows": [], "prompts": []}))
        self.rounds, self.fallbacks = state["rounds"], state["fallbacks"]
        self.live_errors = {label: deque(rounds, maxlen=SELECTION_ROUNDS)  # none in states saved before it
                            for label, rounds in state.get("live_errors", {}).items()}
        self.rounds_worse_than_naive, self.healthy = state["rounds_worse_than_naive"], state["healthy"]

    def save(self, directory: str | os.PathLike) -> None:
        """Write the head (safetensors + JSON) and `state_dict()` into `directory`, atomically: into a temporary
        sibling folder, then renamed, so an interrupted save leaves the old folder or none, never half of one."""
        target = Path(directory)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted save
        try:
            self.head.save_pretrained(tmp)
            torch.save(self.state_dict(), tmp / STATE_NAME)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load(self, directory: str | os.PathLike) -> None:
        """Restore what `save` wrote, keeping whatever is readable. An incomplete folder restores nothing; a file that
        cannot be read (a disk or copy fault) is skipped with a warning naming it and what starts fresh; a head saved
        with another contract is refused (`check_head`); non-finite weights are re-initialised (`load_state_dict`)."""
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME, STATE_NAME)
                   if not os.path.isfile(Path(directory, name))]
        if missing:
            warnings.warn(f"rl-lenbalance: {directory} is incomplete (no {', '.join(missing)}; an interrupted save?): "
                          "the length predictor starts fresh.")
            return
        head = _read(directory, f"{CONFIG_NAME} / {WEIGHTS_NAME}", PLPHead.from_pretrained,
                     "the head's weights start fresh (its optimizer state too)")
        if head is not None:
            check_head(head.config, self.config, self.head.config.hidden_size, self.max_length, str(directory))
            self.head.load_state_dict(head.state_dict())
        state = _read(Path(directory, STATE_NAME), STATE_NAME,
                      lambda path: torch.load(path, map_location="cpu", weights_only=True),
                      "the head's optimizer, replay buffer, naive baseline and health counters start fresh"
                      + (" (the head keeps its saved weights)" if head is not None else ""))
        if state is not None:
            self.load_state_dict(state, optimizer=head is not None)


def _label(step: int) -> str:
    """The metrics' name of a prediction step: `static` at t=0, `plp<step>` after it."""
    return "static" if step == 0 else f"plp{step}"


def _read(path: str | os.PathLike, what: str, reader: Callable, lost: str):
    """`reader(path)`, or None with a warning when the saved file(s) cannot be read (truncated, corrupt)."""
    try:
        return reader(path)
    except Exception as error:  # noqa: BLE001 - any unreadable file: resume without it rather than not at all
        warnings.warn(f"rl-lenbalance: cannot read {what} in {path} ({type(error).__name__}: {error}); {lost}.")
        return None
