"""glibc's allocator on a CPU run: keep freed memory for reuse.

By default glibc serves large blocks with `mmap`, moves that threshold as blocks are freed, and hands freed memory
at the heap's top back to the kernel. A training step frees and re-allocates gigabytes (the KV cache growing token by
token, the loss phase's activations), so every step faults its memory in again, page by page, whenever the moving
thresholds happen to sit low; which steps do depends on what the steps before freed. Fixing both thresholds, as the
`MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` variables would, keeps freed memory in the heap for the next
step (docs/benchmarks/README.md has the measurements and the memory it costs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
THRESHOLD = 1 << 30  # bytes: blocks below it come from the heap, and up to it stays free at the heap's top
VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_kept = False  # whether `keep_freed_memory` set the thresholds in this process


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds at `THRESHOLD` for this process (before its first large allocation).
    Leaves them as they are where either variable of `VARIABLES` is set (the user's choice) or the C library is not
    glibc. Returns whether it set them."""
    if any(name in os.environ for name in VARIABLES):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    global _kept
    _kept = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
    return _kept


def in_force() -> str:
    """What sets this process's thresholds, for a benchmark's record."""
    if _kept:
        return f"rl-lenbalance: mmap and trim thresholds {THRESHOLD} bytes"
    set_by_user = [f"{name}={os.environ[name]}" for name in VARIABLES if name in os.environ]
    return " ".join(set_by_user) or "glibc's defaults"
