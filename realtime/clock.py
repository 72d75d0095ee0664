"""The clock type the session timing runs on: a monotonic reading in seconds.

Everything that compares times across the hot path (the session runtime's ticks, the render lane's
deadlines, the outputs' audio anchoring) takes one of these, so that one clock serves them all and tests
drive them with a manual clock instead of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]
"""Seconds on a monotonic scale; only differences between readings mean anything."""

monotonic_clock: Clock = time.monotonic
