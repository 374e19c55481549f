"""Context features of a row beside its hidden states: its prompt's past lengths (history), its siblings in the round
(the other completions of the same prompt: how many finished by step t, and their lengths), and three estimates of
its remaining length (naive, history, sibling) the head can learn to copy. Everything is known at step t."""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Sequence

import torch

ESTIMATES = ("naive", "history", "sibling", "median")  # a context vector's first columns, remaining / max_length
CANDIDATES = ("head", *ESTIMATES)  # what the scheduler may act on at a step: the head, or an estimate of its context
CONTEXT_SIZE = len(ESTIMATES) + 4
HISTORY_SCALE = math.log1p(64)  # a prompt seen 64 times reads count feature 1
MIN_SUPPORT = 8  # past rows an estimate needs before it stops falling back to naive


class LengthHistory:
    """Finished completions of past rounds: each prompt's last lengths, and each row's length beside its siblings'
    lengths (for the sibling estimate). Bounded: `memory` rows, `prompts` prompts (least recently seen dropped)."""

    def __init__(self, memory: int = 4096, prompts: int = 65_536, per_prompt: int = 64) -> None:
        self.rows: deque[tuple[int, tuple[int, ...]]] = deque(maxlen=memory)
        self.prompts: OrderedDict[int, deque[int]] = OrderedDict()
        self.max_prompts, self.per_prompt = prompts, per_prompt
        self._sibling: dict[tuple[int, int], float | None] = {}  # (step, band) -> estimate, until the next update

    def update(self, prompts: Sequence[int], lengths: Sequence[int]) -> None:
        """Add one round's rows (each once): `prompts[i]` is row i's prompt key, `lengths[i]` its final length."""
        self._sibling.clear()
        groups: dict[int, list[int]] = {}
        for prompt, length in zip(prompts, lengths, strict=True):
            groups.setdefault(prompt, []).append(int(length))
        for prompt, group in groups.items():
            for i, length in enumerate(group):
                self.rows.append((length, tuple(group[:i] + group[i + 1 :])))
            kept = self.prompts.pop(prompt, deque(maxlen=self.per_prompt))
            kept.extend(group)
            self.prompts[prompt] = kept
            if len(self.prompts) > self.max_prompts:
                self.prompts.popitem(last=False)

    def history_estimate(self, prompt: int, step: int) -> float | None:
        """Mean of (L - t) over this prompt's past lengths L > t; None when it has none."""
        alive = [length - step for length in self.prompts.get(prompt, ()) if length > step]
        return sum(alive) / len(alive) if alive else None

    def sibling_estimate(self, step: int, finished: float) -> float | None:
        """Mean of (L - t) over past rows still running at t whose siblings had finished by t in the same proportion
        band as this row's (`finished`: none, up to half, more than half); None below `MIN_SUPPORT` such rows."""
        key = (step, _band(finished))
        if key not in self._sibling:
            alive = [length - step for length, siblings in self.rows if length > step and siblings
                     and _band(sum(s <= step for s in siblings) / len(siblings)) == key[1]]
            self._sibling[key] = sum(alive) / len(alive) if len(alive) >= MIN_SUPPORT else None
        return self._sibling[key]

    def state_dict(self) -> dict[str, list]:
        """Plain lists (readable with `torch.load(weights_only=True)`)."""
        return {"rows": [[length, list(siblings)] for length, siblings in self.rows],
                "prompts": [[prompt, list(lengths)] for prompt, lengths in self.prompts.items()]}

    def load_state_dict(self, state: dict[str, list]) -> None:
        """Restore `state_dict()`."""
        self._sibling.clear()
        self.rows.clear()
        self.rows.extend((int(length), tuple(siblings)) for length, siblings in state["rows"])
        self.prompts.clear()
        for prompt, lengths in state["prompts"]:
            self.prompts[int(prompt)] = deque(lengths, maxlen=self.per_prompt)


def _band(finished: float) -> int:
    return 0 if finished <= 0 else 1 if finished <= 0.5 else 2


def context_vector(history: LengthHistory, naive: float | None, prompt: int, step: int, siblings: Sequence[int],
                   max_length: int, median: float | None = None) -> list[float]:
    """The context of a row of prompt `prompt` still running at `step`; `siblings`: the other rows of its prompt in
    this round, as their final length where it is known to be <= step (finished) and anything larger otherwise;
    `naive` and `median`: the mean and the median remaining length of recent rows past `step`.

    [naive, history, sibling, median estimates of the remaining length, prompt seen (log count), its mean past
    length, fraction of siblings finished, their mean length]; lengths over max_length. A missing estimate
    falls back to naive, and naive (no history at all) to half the tokens left."""
    naive = (max_length - step) / 2 if naive is None else naive
    finished = [length for length in siblings if length <= step]
    fraction = len(finished) / len(siblings) if siblings else 0.0
    past = history.prompts.get(prompt, ())
    estimates = (naive, _or(history.history_estimate(prompt, step), naive),
                 _or(history.sibling_estimate(step, fraction), naive), _or(median, naive))
    return [*(e / max_length for e in estimates), math.log1p(len(past)) / HISTORY_SCALE,
            (sum(past) / len(past) / max_length) if past else 0.0, fraction,
            (sum(finished) / len(finished) / max_length) if finished else 0.0]


def _or(value: float | None, fallback: float) -> float:
    return fallback if value is None else value


def kendall_tau(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kendall's tau-b between two 1-D tensors (ties in either count as neither concordant nor discordant);
    NaN when either is constant."""
    dx = torch.sign(x.float().unsqueeze(0) - x.float().unsqueeze(1))
    dy = torch.sign(y.float().unsqueeze(0) - y.float().unsqueeze(1))
    denominator = (dx.abs().sum() * dy.abs().sum()).sqrt()
    return (dx * dy).sum().item() / denominator.item() if denominator > 0 else float("nan")
