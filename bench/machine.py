"""What a benchmark ran on, for the `device` field of its JSON (stdlib only: GPU hosts lack our extras)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """`cpu: <model name>, <N> cores` — the cores this process may run on, not the host's total."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}, {len(os.sched_getaffinity(0))} cores"
