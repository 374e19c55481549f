"""Time spent by queued device work, measured where it runs: CUDA events on a GPU, the host clock on a CPU."""

from __future__ import annotations

import time

import torch


class DeviceTimer:
    """Sums the seconds between `start()` and `stop()` pairs.

    On CUDA each pair records two events on the current stream, so the time is the stream's own (kernels and the
    gaps the host leaves between them), and nothing waits for the GPU until `seconds` is read. On a CPU the work is
    synchronous and the host clock is exact.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._host_s = 0.0
        self._started: torch.cuda.Event | float | None = None

    def start(self) -> None:
        if self.cuda:
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record()
        else:
            self._started = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._started, end))
        else:
            self._host_s += time.perf_counter() - self._started
        self._started = None

    @property
    def seconds(self) -> float:
        """Total so far (on CUDA: waits for the last recorded event)."""
        if self._events:
            self._events[-1][1].synchronize()
            self._host_s += sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
            self._events.clear()
        return self._host_s
