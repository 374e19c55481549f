"""A stand-in for TRL's `VLLMGeneration` (vLLM cannot be installed here), shared by the single-process backend tests
(tests/test_backends.py) and the two-process one (tests/distributed/admitted_worker.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch


class StandInVLLM:
    """What GRPOTrainer calls on its `vllm_generation` (`mode`, `sync_weights`, `generate`), returning replayed
    completions: a pure function of the prompt, of which copy of it this is in the call, and of the call's index,
    as vLLM's server (one request per group, `n` completions) or colocate mode (one request per row) would.

    Its completions do not depend on the order or rank a request comes in, as a greedy engine's (temperature 0);
    `lengths(prompt)`: the range `[low, high)` a completion's length (before its eos) is drawn from;
    `logprob(token)`: the sampling logprob reported for a token. Neither depends on the rank that asks, so a row
    generated on another rank comes back the same."""

    def __init__(self, mode: str, eos: int, lengths: Callable[[list[int]], tuple[int, int]] = lambda prompt: (1, 30),
                 logprob: Callable[[int], float] = lambda token: -0.5) -> None:
        self.mode, self.eos, self.submitted = mode, eos, []
        self.temperature, self.generation_kwargs = 0.0, {}  # what TRL's `VLLMGeneration` samples with
        self.lengths, self.logprob = lengths, logprob

    def sync_weights(self) -> None:
        pass

    def generate(self, prompts, images, num_generations, profiler):
        self.submitted.append([tuple(p) for p in prompts])
        requests = prompts[::num_generations] if self.mode == "server" else prompts
        n = num_generations if self.mode == "server" else 1
        seen: dict[tuple, int] = {}
        completions = []
        for prompt in requests:
            for _ in range(n):
                k = seen[tuple(prompt)] = seen.get(tuple(prompt), -1) + 1
                g = torch.Generator().manual_seed(sum(prompt) * 31 + 7919 * k + 104729 * len(self.submitted))
                length = int(torch.randint(*self.lengths(prompt), (1,), generator=g))
                completions.append(torch.randint(10, 500, (length,), generator=g).tolist() + [self.eos])
        logprobs = [[[self.logprob(token)] for token in c] for c in completions]
        return prompts, completions, logprobs, None


def with_stand_in(trainer, mode: str, **stand_in):
    """`trainer` generating through a `StandInVLLM(mode, ..., **stand_in)`, as `use_vllm=True` would set it up."""
    trainer.use_vllm, trainer.vllm_mode, trainer._last_loaded_step = True, mode, -1
    trainer.vllm_importance_sampling_correction = False
    trainer.vllm_generation = StandInVLLM(mode, trainer.eos_token_ids[0], **stand_in)
    return trainer
