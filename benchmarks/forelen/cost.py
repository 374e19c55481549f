"""What a predictor costs per decode step: measured inside generation (the capture hooks) and in isolation."""

from __future__ import annotations

import time

import torch

from rl_lenbalance.predictor import HeadConfig, PLPHead, StreamingPool, plp_features

from .dataset import BenchData
from .models import BucketClassifier


def microseconds(fn, repeats: int = 200) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1e6 * (time.perf_counter() - start) / repeats


@torch.no_grad()
def step_cost(data: BenchData) -> dict:
    """Per decode step at the build's batch size: the in-loop hook time (entropy over the vocabulary, streaming pool,
    PLP head, as measured during the build), the pool + head alone, TRAIL's MLP alone, and the model's step time."""
    timing, batch = data.meta["timing"], int(data.meta["batch_size"])
    hidden = int(data.meta["hidden_size"])
    hook_us = 1e6 * timing["hook_seconds"] / timing["steps"]
    model_us = 1e6 * (timing["seconds"] - timing["hook_seconds"]) / timing["steps"]
    head = PLPHead(HeadConfig(hidden, data.max_length)).eval()
    pool = StreamingPool(batch, hidden)
    prompt, token, entropy = torch.randn(batch, hidden), torch.randn(batch, hidden), torch.rand(batch)

    def plp_step() -> None:
        pool.update(token, entropy)
        head.predict(plp_features(prompt, pool, 10, data.max_length))

    trail = BucketClassifier(hidden, torch.linspace(0, data.max_length + 1, 11), "expected", hidden=256).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(int(data.meta["torch_threads"]))  # as the model's step time was measured
    try:
        plp_us, trail_us = microseconds(plp_step), microseconds(lambda: trail.predict(token))
    finally:
        torch.set_num_threads(threads)
    return {
        "batch_size": batch,
        "model_step_ms": model_us / 1e3,
        "capture_hooks_us": hook_us, "capture_hooks_pct": 100 * hook_us / model_us,
        "plp_pool_and_head_us": plp_us, "plp_pool_and_head_pct": 100 * plp_us / model_us,
        "trail_mlp_us": trail_us, "trail_mlp_pct": 100 * trail_us / model_us,
        "proxy_encoder_us_per_prompt": 1e6 * data.meta["proxy_seconds_per_prompt"],
        "torch_threads": data.meta["torch_threads"],
    }
