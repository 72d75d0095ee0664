"""A readiness answer shared by every probe for a bounded time.

Load balancers, Kubernetes and dashboards probe /readyz and /health often, and each answer reads
every placement registry and asks Temporal about task queues. `ReadinessCache` computes one answer
at a time and hands it to every probe for `max_age_s`, so the work Temporal sees is bounded by
the cache age, not by the probe rate.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

Checks = dict[str, Any]
# (ready, checks): what api.routes.ops.readiness answers.
Answer = tuple[bool, Checks]

# How long one readiness answer serves every probe: well below any probe period and a sidecar's lease.
READINESS_MAX_AGE_S = 1.0


class ReadinessCache:
    """The latest readiness answer, reused for `max_age_s`; concurrent probes share one computation."""

    def __init__(self, max_age_s: float = READINESS_MAX_AGE_S) -> None:
        if max_age_s < 0:
            raise ValueError(f"max_age_s must be >= 0 (got {max_age_s})")
        self.max_age_s = max_age_s
        self._answer: Answer | None = None
        self._computed_at_s = 0.0  # time.monotonic() when _answer was computed
        self._lock = asyncio.Lock()
        self.computations = 0

    async def get(self, compute: Callable[[], Awaitable[Answer]]) -> tuple[Answer, float]:
        """The answer and its age in seconds: the cached one while younger than max_age_s, else a new one."""
        async with self._lock:  # probes arriving during a computation wait for it instead of repeating it
            age_s = time.monotonic() - self._computed_at_s
            if self._answer is None or age_s > self.max_age_s:
                self._answer = await compute()
                self._computed_at_s = time.monotonic()
                self.computations += 1
                age_s = 0.0
            return self._answer, age_s
