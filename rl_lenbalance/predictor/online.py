"""Online training of the length head from rollouts that just finished, with a bounded replay buffer."""

from __future__ import annotations

import warnings
from collections import deque

import torch

from .head import PLPHead


class ReplayBuffer:
    """Ring buffer of (feature, remaining length) pairs on the CPU, float16 features."""

    def __init__(self, capacity: int, width: int) -> None:
        self.features = torch.zeros(capacity, width, dtype=torch.float16)
        self.targets = torch.zeros(capacity)
        self.capacity, self.size, self._next = capacity, 0, 0

    def add(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """Append rows, overwriting the oldest once full."""
        features, targets = features[-self.capacity :], targets[-self.capacity :]
        idx = (self._next + torch.arange(len(targets))) % self.capacity
        self.features[idx] = features.detach().to("cpu", torch.float16)
        self.targets[idx] = targets.detach().float().cpu()
        self._next = int(idx[-1] + 1) % self.capacity if len(idx) else self._next
        self.size = min(self.capacity, self.size + len(targets))

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """The filled rows and the write position."""
        return {"features": self.features[: self.size].clone(), "targets": self.targets[: self.size].clone(),
                "next": self._next}

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        """Restore `state_dict()`; into a buffer of another capacity, the rows are re-added oldest first."""
        features, targets, position = state["features"], state["targets"], int(state["next"])
        if len(targets) == self.capacity:
            self.features.copy_(features)
            self.targets.copy_(targets)
            self.size, self._next = self.capacity, position % self.capacity
            return
        if len(targets) and position != len(targets):  # a full buffer of another capacity: oldest row at `position`
            order = (position + torch.arange(len(targets))) % len(targets)
            features, targets = features[order], targets[order]
        self.size, self._next = 0, 0
        self.add(features, targets)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A uniform random minibatch (with replacement)."""
        idx = torch.randint(self.size, (batch_size,), generator=generator)
        return self.features[idx].float(), self.targets[idx]


class NaiveLengthBaseline:
    """What a predictor must beat: the mean remaining length of recent completions that got past step t."""

    def __init__(self, history: int = 4096) -> None:
        self.lengths: deque[int] = deque(maxlen=history)

    def predict_remaining(self, steps: int) -> float | None:
        """Mean of (L - t) over remembered lengths L > t; None before any history."""
        alive = [length - steps for length in self.lengths if length > steps]
        return sum(alive) / len(alive) if alive else None

    def predict_median(self, steps: int) -> float | None:
        """Median of (L - t) over remembered lengths L > t (the MAE-optimal constant); None before any history."""
        alive = torch.tensor([length - steps for length in self.lengths if length > steps], dtype=torch.float32)
        return alive.median().item() if len(alive) else None

    def update(self, lengths: list[int]) -> None:
        self.lengths.extend(int(x) for x in lengths)


class OnlineTrainer:
    """Takes a few AdamW steps on the head after every generation round; skips non-finite updates."""

    def __init__(
        self,
        head: PLPHead,
        lr: float = 1e-3,
        buffer_size: int = 20_000,
        batch_size: int = 256,
        steps_per_round: int = 20,
        seed: int = 0,
    ) -> None:
        self.head = head
        self.optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
        self.buffer = ReplayBuffer(buffer_size, head.net[0].in_features)
        self.batch_size, self.steps_per_round = batch_size, steps_per_round
        self.generator = torch.Generator().manual_seed(seed)
        self.skipped_updates = 0
        self._warned = False

    def mean_abs_error(self, features: torch.Tensor, remaining: torch.Tensor) -> float:
        """MAE in tokens of the head's current predictions (call before `observe` for the honest online error)."""
        return (self.head.predict(features).cpu() - remaining.float().cpu()).abs().mean().item()

    def observe(self, features: torch.Tensor, remaining: torch.Tensor) -> float | None:
        """Add fresh pairs to the buffer and train; returns the mean loss of the finite steps (None if none)."""
        finite = torch.isfinite(features).all(1) & torch.isfinite(remaining)
        self.buffer.add(features[finite], remaining[finite])
        if self.buffer.size == 0:
            return None
        self.head.train()
        losses = []
        for _ in range(self.steps_per_round):
            z, y = self.buffer.sample(self.batch_size, self.generator)
            loss = self.head.loss(z.to(self._device), y.to(self._device))
            if not torch.isfinite(loss):
                self._skip(f"non-finite predictor loss ({loss.item()})")
                continue
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
        self.head.eval()
        return sum(losses) / len(losses) if losses else None

    @property
    def _device(self) -> torch.device:
        return self.head.net[0].weight.device

    def _skip(self, why: str) -> None:
        self.skipped_updates += 1
        if not self._warned:
            warnings.warn(f"rl-lenbalance: skipped a predictor update: {why}; counted in "
                          "lenbalance/predictor/skipped_updates.")
            self._warned = True
