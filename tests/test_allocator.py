"""`rl-lenbalance train` on a CPU keeps freed memory for reuse (`cli.allocator`), unless the user set glibc's
thresholds. Counts of page faults, not timings: each case runs in a fresh process, since glibc reads its variables
at start and `mallopt` changes the whole process."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO

from rl_lenbalance.cli.allocator import VARIABLES

# blocks of 64 MiB: above glibc's highest moving mmap threshold (32 MiB), so by default each one is mapped afresh and
# faulted in page by page; with the thresholds fixed, the freed block is reused from the heap
REALLOCATE = """
import resource, torch
from rl_lenbalance.cli import allocator
kept = allocator.keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(64 << 20, dtype=torch.uint8)
before = faults()
for _ in range(10):
    torch.ones(64 << 20, dtype=torch.uint8)
print(kept, faults() - before, allocator.in_force())
"""


def _reallocate(**variables: str) -> tuple[bool, int, str]:
    env = {key: value for key, value in os.environ.items() if key not in VARIABLES} | variables
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", REALLOCATE], env=env, capture_output=True, text=True, timeout=300,
                         check=True).stdout.split(maxsplit=2)
    return out[0] == "True", int(out[1]), out[2].strip()


def test_freed_memory_is_reused_instead_of_faulted_in_again():
    kept, kept_faults, record = _reallocate()
    assert kept and record.startswith("rl-lenbalance: mmap and trim thresholds")
    left, glibc_faults, record = _reallocate(MALLOC_TRIM_THRESHOLD_="131072")  # the user's choice stands
    assert not left and record == "MALLOC_TRIM_THRESHOLD_=131072"
    # 10 blocks of 16,384 pages of 4 KiB each: glibc faults in every one; kept, most are reused
    assert glibc_faults > 10 * 16_384 * 0.9 and kept_faults < glibc_faults / 4
