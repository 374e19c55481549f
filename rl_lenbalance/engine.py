"""The predictor's life in a training loop, framework-free: capture during generation, honest online error,
online training on the finished rollouts, fallback when it fails. TRL adapters call this; it never imports TRL."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .capture import CaptureResult, GenerationCapture, StreamState, record_steps
from .config import LenBalanceConfig
from .predictor import (
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
from .predictor.context import ESTIMATES
from .predictor.head import CONFIG_NAME, WEIGHTS_NAME

STATE_NAME = "engine_state.pt"  # beside the head's files: its optimizer, replay buffer, baseline and health
Gather = Callable[[torch.Tensor], torch.Tensor]  # this rank's rows -> every rank's rows, in rank order

PLP_REPORT_STEP = 32  # the PLP error is reported after this many observed tokens (the paper's t = 32)


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
    names = ("hidden_size", "max_length", "pooling", "feature_layer", "context_size")
    expected = {name: getattr(wanted, name) for name in names}
    fixes = {"hidden_size": "point lenbalance.predictor_path at a head trained on this model",
             "max_length": "set max_completion_length to the head's, or train a new head",
             "pooling": "set lenbalance.pooling to the head's",
             "feature_layer": "set lenbalance.feature_layer to the head's",
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
    (`y0`/`y32` = -1 where the row ended earlier), its prompt's key and its final length. Per sample
    (`samples_per_sequence` slots per entry): a (feature, remaining length, step) triple, `y` = -1 where unused."""

    z0: torch.Tensor  # (E, F)
    y0: torch.Tensor  # (E,)
    z32: torch.Tensor  # (E, F)
    y32: torch.Tensor  # (E,)
    row: torch.Tensor  # (E,) the row's id (unique across ranks; a re-bucketed row has an entry per wave), -1: none
    prompt: torch.Tensor  # (E,) int64 key of the row's prompt (`CaptureResult.prompt_keys`)
    length: torch.Tensor  # (E,) final length of the row
    z: torch.Tensor  # (E * S, F)
    y: torch.Tensor  # (E * S,)
    step: torch.Tensor  # (E * S,) decode step of each sample

    @classmethod
    def empty(cls, entries: int, samples: int, width: int) -> TrainingPairs:
        """`entries` invalid entries of `samples` invalid samples each."""
        return cls(z0=torch.zeros(entries, width), y0=torch.full((entries,), -1.0), z32=torch.zeros(entries, width),
                   y32=torch.full((entries,), -1.0), row=torch.full((entries,), -1, dtype=torch.long),
                   prompt=torch.zeros(entries, dtype=torch.long),
                   length=torch.zeros(entries, dtype=torch.long), z=torch.zeros(entries * samples, width),
                   y=torch.full((entries * samples,), -1.0),
                   step=torch.full((entries * samples,), -1, dtype=torch.long))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TrainingPairs:
        """`fn` applied to every tensor (e.g. a gather over ranks)."""
        return TrainingPairs(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})


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
        context = self.context_at if config.context_features else None
        self.capture = GenerationCapture(model, self.predict, config, max_length, context)
        self.trainer = new_trainer(self.head, config, seed)
        self.baseline = NaiveLengthBaseline()
        self.history = LengthHistory()
        self.rounds = 0
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
            for j, row in enumerate(wave.rows):
                length = lengths[row]
                out.row[entry], out.prompt[entry], out.length[entry] = row, wave.capture.prompt_keys[j], length
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
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """The head's predicted remaining length (float32, on the features' device) of each row of PLP features."""
        return self.head.predict(features.to(self.head.edges.device)).to(features.device, torch.float32)

    def predict_remaining(self, state: StreamState) -> torch.Tensor:
        """PLP: the remaining length of each row of `state`, after the tokens it has seen (on the CPU)."""
        z = plp_features(state.prompt, state.pool, state.steps, self.max_length)
        if self.config.context_features:
            z = torch.cat([z, self.context_at(state.keys, state.steps).to(z)], 1)
        return self.predict(z).cpu()

    def context_at(self, prompts: list[int], step: int) -> torch.Tensor:
        """(B, CONTEXT_SIZE) context of rows of these prompt keys during generation, at `step`. Which siblings
        finished is not visible to the hooks: they count as running (exact at step 0, what the scheduler reads)."""
        naive, median = self.baseline.predict_remaining(step), self.baseline.predict_median(step)
        return torch.tensor([context_vector(self.history, naive, p, step, [], self.max_length, median)
                             for p in prompts])

    def round_context(self, pairs: TrainingPairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Context vectors of the entries at t=0 and t=32 and of the samples, from the round's rows (`pairs` holds
        every rank's: each row's siblings are the other rows of its prompt) and the history before this round."""
        groups: dict[int, dict[int, int]] = {}
        for row, prompt, length in zip(pairs.row.tolist(), pairs.prompt.tolist(), pairs.length.tolist(), strict=True):
            if row >= 0:
                groups.setdefault(prompt, {})[row] = length
        baseline: dict[int, tuple[float | None, float | None]] = {}  # step -> (naive, median)

        def vector(entry: int, step: int) -> list[float]:
            row, prompt = int(pairs.row[entry]), int(pairs.prompt[entry])
            if step not in baseline:
                baseline[step] = self.baseline.predict_remaining(step), self.baseline.predict_median(step)
            siblings = [length for other, length in groups.get(prompt, {}).items() if other != row]
            naive, median = baseline[step]
            return context_vector(self.history, naive, prompt, step, siblings, self.max_length, median)

        entries, samples = len(pairs.row), self.config.samples_per_sequence
        zeros = [0.0] * CONTEXT_SIZE
        at = [torch.tensor([vector(e, step) if pairs.row[e] >= 0 else zeros for e in range(entries)]).reshape(
            entries, CONTEXT_SIZE) for step in (0, PLP_REPORT_STEP)]
        sampled = torch.tensor([vector(i // samples, int(step)) if y >= 0 else zeros
                                for i, (y, step) in enumerate(zip(pairs.y.tolist(), pairs.step.tolist()))])
        return at[0], at[1], sampled.reshape(len(pairs.y), CONTEXT_SIZE)

    def learn_round(self, waves: list[Wave], lengths: Mapping[int, int], own_ids: list[int],
                    gather: Gather) -> tuple[dict[str, float], list[tuple[float, int]]]:
        """The online update after a round: every rank's training pairs and lengths (`gather` concatenates the
        ranks' rows in rank order; ranks may hold different counts, padded with -1), scored then learned.
        Returns the metrics and the (predicted at t=0, actual) length of every rank's own rows (`own_ids`)."""
        pairs = self.training_pairs(waves, lengths).map(gather)
        predicted0 = torch.full((len(own_ids),), float("nan"))
        position = {row: i for i, row in enumerate(own_ids)}
        for wave in waves:
            if 0 in wave.capture.prediction_steps:  # a probe or plain wave: its rows are this rank's own
                predicted0[[position[row] for row in wave.rows]] = wave.capture.predicted_total(0).float().cpu()
        actual = gather(torch.tensor([lengths[row] for row in own_ids]))
        table = list(zip(gather(predicted0).tolist(), actual.tolist(), strict=True))
        return self.learn(pairs, actual), table

    def learn(self, pairs: TrainingPairs, lengths: torch.Tensor) -> dict[str, float]:
        """Score the head and the naive / history / sibling estimates on fresh rollouts (before the head sees them),
        then train on them. `pairs` and `lengths` must already hold every rank's rows, so every rank trains an
        identical head."""
        metrics: dict[str, float] = {}
        start = time.perf_counter()
        c0, c32, c = self.round_context(pairs)
        inputs = (lambda z, ctx: torch.cat([z, ctx], 1)) if self.config.context_features else (lambda z, ctx: z)
        for label, step, z, ctx, y in (("static", 0, pairs.z0, c0, pairs.y0),
                                       ("plp32", PLP_REPORT_STEP, pairs.z32, c32, pairs.y32)):
            valid = y >= 0
            if not valid.any():
                continue
            y = y[valid]
            predicted = self.predict(inputs(z[valid], ctx[valid])).cpu()
            metrics[f"predictor/mae_{label}"] = (predicted - y).abs().mean().item()
            history = self.baseline.predict_remaining(step) is not None
            for k, name in enumerate(ESTIMATES):  # before any history, naive is half the tokens left (its fallback)
                if history or name == "naive":
                    metrics[f"predictor/mae_{name}_{label}"] = (ctx[valid, k] * self.max_length - y).abs().mean().item()
            if label == "plp32" and valid.sum() > 1:
                metrics["predictor/kendall_plp32"] = kendall_tau(predicted, y)
        self._update_health(metrics)
        valid = pairs.y >= 0
        with private_rng(self.seed + self.rounds):
            loss = self.trainer.observe(inputs(pairs.z, c)[valid], pairs.y[valid])
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
        self.history.load_state_dict(state.get("history", {"rows": [], "prompts": []}))  # none in states saved before it
        self.rounds, self.fallbacks = state["rounds"], state["fallbacks"]
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
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME, STATE_NAME) if not os.path.isfile(Path(directory, name))]
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


def _read(path: str | os.PathLike, what: str, reader: Callable, lost: str):
    """`reader(path)`, or None with a warning when the saved file(s) cannot be read (truncated, corrupt)."""
    try:
        return reader(path)
    except Exception as error:  # noqa: BLE001 - any unreadable file: resume without it rather than not at all
        warnings.warn(f"rl-lenbalance: cannot read {what} in {path} ({type(error).__name__}: {error}); {lost}.")
        return None
