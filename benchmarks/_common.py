"""What every benchmark output file records beside its results: the command, the machine and the date."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone

import torch


def save_report(path: str, results: list[dict], extra: dict | None = None) -> None:
    """Write `results` (and `extra`'s keys) to `path` as JSON with the command line that made them and the machine
    they ran on."""
    launcher = f"torchrun --nproc_per_node {os.environ['WORLD_SIZE']} " if "WORLD_SIZE" in os.environ else "python "
    machine = (torch.cuda.get_device_name() if torch.cuda.is_available()
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    report = {
        "command": launcher + " ".join(sys.argv),
        "machine": f"{machine}, torch {torch.__version__}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
        "results": results,
    }
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
