"""How many threads avatar preparation uses on the host for work that releases the GIL (image decoding in
OpenCV, dlib's face detector)."""

from __future__ import annotations

import os

PREPARE_MAX_THREADS = 8


def prepare_threads() -> int:
    """Up to half the cores this process may use, at most `PREPARE_MAX_THREADS`: live sessions assemble and
    send their frames on the same host while an avatar is prepared."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(PREPARE_MAX_THREADS, cores // 2))
