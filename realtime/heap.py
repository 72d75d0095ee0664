"""The process's long-lived heap and Python's cyclic garbage collector: keep full collections short.

Why: once the engine is loaded (torch, transformers, the models; with compile, dynamo's and inductor's
caches and graphs) a sidecar holds hundreds of thousands to millions of Python objects that live as long as
the process. A full (generation-2) collection scans every one of them with the GIL held: 0.2-0.35 s on a
2-core machine with the full-size models and no compile (480,000 objects), 0.71 s on an H200 host after a
compile (1.31 million; bench/results/runtime-notes.md, "Stalls"). For that long the event loop (every
session's clock, the audio sockets) and the render thread's Python both stop; live sessions fall behind
and resync their clocks. Collections of that generation come when enough new objects survived, so in a
busy sidecar they arrive at unrelated moments, often when many sessions start at once.

`freeze_long_lived` moves every object tracked at that moment into the collector's permanent generation
(`gc.freeze`), which no collection scans; objects made afterwards are collected as before, so a full
collection costs what the serving state holds (sessions, buffers), not what loading left behind. The
price: a frozen object that later becomes part of a reference cycle with no outside references is never
freed (objects freed by reference counting still are). Freezing right after a collection limits that to
what loading made; a later freeze (after a background compile) may keep a few such cycles of what lived
then, once.

`GcPauses` times every collection (a `gc.callbacks` hook) so a stall can be told apart from a slow
render: the sidecar's `/healthz` and `bench.sessions` report them.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

GENERATIONS = 3
# Pauses this long are kept one by one (the latest LONG_PAUSES): a 40 ms frame interval's quarter, below any
# stall a session would notice, far above a young generation's usual cost.
LONG_PAUSE_MS = 10.0
LONG_PAUSES = 64


@dataclass(frozen=True)
class HeapFreeze:
    """What one `freeze_long_lived` did: the objects it froze and how long its collection took."""

    frozen_objects: int  # the permanent generation's size afterwards
    collect_ms: float  # 0 when it did not collect first


def freeze_long_lived(*, collect_first: bool) -> HeapFreeze:
    """Collect (when `collect_first`, so garbage is not kept alive) and freeze what remains.

    Call it once loading is done and before serving (a collection of the whole heap is a pause of its
    own); `collect_first=False` where sessions are live, as the freeze itself costs no scan."""
    collect_ms = 0.0
    if collect_first:
        started = time.perf_counter()
        gc.collect()
        collect_ms = (time.perf_counter() - started) * 1000.0
    gc.freeze()
    frozen = HeapFreeze(frozen_objects=gc.get_freeze_count(), collect_ms=round(collect_ms, 1))
    logger.info(
        "long-lived heap frozen",
        extra={"frozen_objects": frozen.frozen_objects, "collect_ms": frozen.collect_ms},
    )
    return frozen


@dataclass(frozen=True)
class GcPause:
    at_s: float  # the monotonic clock when the collection started
    generation: int
    pause_ms: float

    def as_row(self, origin_s: float) -> list[float]:
        """[s from `origin_s` to its start, generation, ms]: how the benchmarks' JSON lists pauses."""
        return [round(self.at_s - origin_s, 3), self.generation, round(self.pause_ms, 1)]


@dataclass(frozen=True)
class GcPauseStats:
    collections: tuple[int, ...]  # per generation, since the monitor was installed
    pause_ms_max: tuple[float, ...]  # per generation
    pause_ms_total: float
    frozen_objects: int  # the permanent generation now (see freeze_long_lived)
    long_pauses: tuple[GcPause, ...]  # the latest pauses of at least the monitor's threshold, oldest first

    def as_report(self) -> dict[str, object]:
        """The JSON-friendly form (/healthz): counts and the longest pause per generation."""
        return {
            "collections_by_generation": list(self.collections),
            "pause_ms_max_by_generation": [round(ms, 2) for ms in self.pause_ms_max],
            "pause_ms_total": round(self.pause_ms_total, 1),
            "frozen_objects": self.frozen_objects,
        }


class GcPauses:
    """Times every collection of this process while installed (`install()`/`uninstall()`, or `with`)."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, *, long_pause_ms: float = LONG_PAUSE_MS
    ) -> None:
        self._clock = clock
        self._long_pause_ms = long_pause_ms
        self._started_s: float | None = None
        self._collections = [0] * GENERATIONS
        self._max_ms = [0.0] * GENERATIONS
        self._total_ms = 0.0
        self._long: deque[GcPause] = deque(maxlen=LONG_PAUSES)

    def install(self) -> GcPauses:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)
        return self

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def __enter__(self) -> GcPauses:
        return self.install()

    def __exit__(self, *_exc: object) -> None:
        self.uninstall()

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        # No lock here or in `stats`: any allocation (`stats` building its snapshot, say) may start a
        # collection on the thread that holds it, and this callback would then wait for itself forever.
        # Collections never overlap (the collector holds the GIL throughout), so this callback is the only
        # writer, one start time suffices, and a reader at worst sees one collection half counted.
        now_s = self._clock()
        if phase == "start":
            self._started_s = now_s
            return
        started_s, self._started_s = self._started_s, None
        if started_s is None:
            return  # installed mid-collection
        generation = min(max(int(info.get("generation", 0)), 0), GENERATIONS - 1)
        pause_ms = (now_s - started_s) * 1000.0
        self._collections[generation] += 1
        self._max_ms[generation] = max(self._max_ms[generation], pause_ms)
        self._total_ms += pause_ms
        if pause_ms >= self._long_pause_ms:
            self._long.append(GcPause(started_s, generation, pause_ms))

    def stats(self) -> GcPauseStats:
        return GcPauseStats(
            collections=tuple(self._collections),
            pause_ms_max=tuple(self._max_ms),
            pause_ms_total=self._total_ms,
            frozen_objects=gc.get_freeze_count(),
            long_pauses=tuple(self._long),
        )
