"""The predictor's life in a training loop, framework-free: capture during generation, honest online error,
online training on the finished rollouts, fallback when it fails. TRL adapters call this; it never imports TRL."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .capture import CaptureResult, GenerationCapture, StreamState, record_steps
from .config import LenBalanceConfig
from .predictor import HeadConfig, NaiveLengthBaseline, OnlineTrainer, PLPHead, feature_size, plp_features
from .predictor.head import CONFIG_NAME, WEIGHTS_NAME

STATE_NAME = "engine_state.pt"  # beside the head's files: its optimizer, replay buffer, baseline and health
Gather = Callable[[torch.Tensor], torch.Tensor]  # this rank's rows -> every rank's rows, in rank order

PLP_REPORT_STEP = 32  # the PLP error is reported after this many observed tokens (the paper's t = 32)


def check_head(head: HeadConfig, config: LenBalanceConfig, hidden_size: int, max_length: int, path: str) -> None:
    """Refuse a saved head whose contract differs from this run's: it would silently read other features."""
    expected = {"hidden_size": hidden_size, "max_length": max_length, "pooling": config.pooling,
                "feature_layer": config.feature_layer}
    fixes = {"hidden_size": "point lenbalance.predictor_path at a head trained on this model",
             "max_length": "set max_completion_length to the head's, or train a new head",
             "pooling": "set lenbalance.pooling to the head's", "feature_layer": "set lenbalance.feature_layer to the head's"}
    wrong = [name for name, value in expected.items() if getattr(head, name) != value]
    if wrong:
        raise ValueError(
            f"The length head at lenbalance.predictor_path={path!r} was trained with "
            + ", ".join(f"{name}={getattr(head, name)!r}" for name in wrong) + "; this run has "
            + ", ".join(f"{name}={expected[name]!r}" for name in wrong) + ". Fix: "
            + "; ".join(fixes[name] for name in wrong) + " (or unset lenbalance.predictor_path to train from scratch)."
        )


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
                head = PLPHead(HeadConfig(hidden, max_length, config.num_bins, config.ce_weight, config.dropout,
                                          config.pooling, config.feature_layer))
        self.head = head.to(device).eval()
        self.config, self.max_length, self.seed = config, max_length, seed
        self.capture = GenerationCapture(model, self.predict, config, max_length)
        self.trainer = OnlineTrainer(self.head, config.predictor_lr, config.replay_buffer_size,
                                     config.predictor_batch_size, config.predictor_steps_per_round, seed)
        self.baseline = NaiveLengthBaseline()
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

    def training_pairs(self, waves: list[Wave], lengths: Mapping[int, int]) -> dict[str, torch.Tensor]:
        """Fixed-shape tensors (an entry per row of each wave; invalid entries have target -1) of the PLP features at
        t=0 and t=32, and `samples_per_sequence` sampled (feature, remaining length) pairs per row.

        A re-bucketed row is split over two waves, maybe on two ranks (`lengths` maps row id → final length). The
        steps of a row are drawn from a generator seeded by its id, so each wave keeps the draws it holds and the
        row yields the same pairs as if one call had generated it.
        """
        entries, width = sum(len(w.rows) for w in waves), feature_size(self.head.config.hidden_size)
        samples = self.config.samples_per_sequence
        out = {
            "z0": torch.zeros(entries, width), "z32": torch.zeros(entries, width),
            "y0": torch.full((entries,), -1.0), "y32": torch.full((entries,), -1.0),
            "z": torch.zeros(entries * samples, width), "y": torch.full((entries * samples,), -1.0),
        }
        entry = 0
        for wave in waves:
            recorded = {step: z.float().cpu() for step, z in wave.capture.recorded.items()}  # one copy per step
            for j, row in enumerate(wave.rows):
                length = lengths[row]
                steps = [s for s in self._steps if s < length]
                for name, step in (("0", 0), ("32", PLP_REPORT_STEP)):
                    if step in steps and step in recorded:
                        out[f"z{name}"][entry] = recorded[step][j]
                        out[f"y{name}"][entry] = float(length - step)
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rounds * 100_003 + row)
                picks = [steps[p] for p in torch.randperm(len(steps), generator=generator)[:samples].tolist()]
                for k, step in enumerate(s for s in picks if s in recorded):
                    out["z"][entry * samples + k] = recorded[step][j]
                    out["y"][entry * samples + k] = float(length - step)
                entry += 1
        return out

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """The head's predicted remaining length (float32, on the features' device) of each row of PLP features."""
        return self.head.predict(features.to(self.head.edges.device)).to(features.device, torch.float32)

    def predict_remaining(self, state: StreamState) -> torch.Tensor:
        """PLP: the remaining length of each row of `state`, after the tokens it has seen (on the CPU)."""
        return self.predict(plp_features(state.prompt, state.pool, state.steps, self.max_length)).cpu()

    def learn_round(self, waves: list[Wave], lengths: Mapping[int, int], own_ids: list[int],
                    gather: Gather) -> tuple[dict[str, float], list[tuple[float, int]]]:
        """The online update after a round: every rank's training pairs and lengths (`gather` concatenates the
        ranks' rows in rank order; ranks may hold different counts, padded with -1), scored then learned.
        Returns the metrics and the (predicted at t=0, actual) length of every rank's own rows (`own_ids`)."""
        pairs = {k: gather(v) for k, v in self.training_pairs(waves, lengths).items()}
        predicted0 = torch.full((len(own_ids),), float("nan"))
        position = {row: i for i, row in enumerate(own_ids)}
        for wave in waves:
            if 0 in wave.capture.prediction_steps:  # a probe or plain wave: its rows are this rank's own
                predicted0[[position[row] for row in wave.rows]] = wave.capture.predicted_total(0).float().cpu()
        actual = gather(torch.tensor([lengths[row] for row in own_ids]))
        table = list(zip(gather(predicted0).tolist(), actual.tolist(), strict=True))
        return self.learn(pairs, actual), table

    def learn(self, pairs: dict[str, torch.Tensor], lengths: torch.Tensor) -> dict[str, float]:
        """Score the head on fresh rollouts (before it sees them), then train on them. `pairs` and `lengths` must
        already hold every rank's rows, so every rank trains an identical head."""
        metrics: dict[str, float] = {}
        start = time.perf_counter()
        for name in ("0", "32"):
            valid = pairs[f"y{name}"] >= 0
            if valid.any():
                z, y = pairs[f"z{name}"][valid], pairs[f"y{name}"][valid]
                mae = self.trainer.mean_abs_error(z.to(self.head.edges.device), y)
                naive = self.baseline.predict_remaining(0 if name == "0" else PLP_REPORT_STEP)
                label = "static" if name == "0" else "plp32"
                metrics[f"predictor/mae_{label}"] = mae
                if naive is not None:
                    metrics[f"predictor/mae_naive_{label}"] = (y - naive).abs().mean().item()
        self._update_health(metrics)
        valid = pairs["y"] >= 0
        with private_rng(self.seed + self.rounds):
            loss = self.trainer.observe(pairs["z"][valid], pairs["y"][valid])
        if loss is not None:
            metrics["predictor/loss"] = loss
        if not self.head_is_finite():
            self._fall_back("its weights or bin values became non-finite; re-initialising the head")
            self._reinitialise()
        self.baseline.update(lengths.tolist())
        self.rounds += 1
        metrics["predictor/train_s"] = time.perf_counter() - start
        metrics["predictor/skipped_updates"] = float(self.trainer.skipped_updates)
        metrics["predictor/fallbacks"] = float(self.fallbacks)
        metrics["predictor/healthy"] = float(self.healthy)
        return metrics

    def _update_health(self, metrics: dict[str, float]) -> None:
        mae, naive = metrics.get("predictor/mae_static"), metrics.get("predictor/mae_naive_static")
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
        self.trainer = OnlineTrainer(self.head, self.config.predictor_lr, self.config.replay_buffer_size,
                                     self.config.predictor_batch_size, self.config.predictor_steps_per_round, self.seed)

    def state_dict(self) -> dict:
        """Everything besides the head's weights needed to resume: its optimizer, the replay buffer and sampling RNG,
        the naive baseline's history and the health counters (tensors and plain values: `torch.load(weights_only=True)`
        reads it back)."""
        return {"optimizer": self.trainer.optimizer.state_dict(), "buffer": self.trainer.buffer.state_dict(),
                "generator": self.trainer.generator.get_state(), "skipped_updates": self.trainer.skipped_updates,
                "baseline": list(self.baseline.lengths), "rounds": self.rounds, "fallbacks": self.fallbacks,
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
