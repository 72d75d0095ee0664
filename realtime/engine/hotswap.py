"""Serve on a variant that warms in seconds while a faster one is built in the background, then swap.

A compiled engine takes minutes to warm up in a new process even with its prebuilt artifact (dynamo traces
the models again, inductor loads and launches every kernel), while the same models replayed as CUDA graphs of
the eager modules are servable seconds after the process starts. `VariantSwap` runs the slow build on a
daemon thread and installs its result with one reference assignment, so the render thread never waits for it:
a batch already started finishes on the variant it started on, the next one runs on the new one. A build that
fails leaves the engine serving its current variant and says why in `state()` (the sidecar's status shows
it), never silently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from realtime.heap import freeze_long_lived

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class ServingState:
    """Which engine variant renders now, and what is being built to replace it."""

    variant: str  # e.g. "eager-graphs", "compiled"
    building: str = ""  # the variant a background build will swap in ("": none under way)
    error: str = ""  # why the last background build failed: the engine kept `variant`
    swapped_at_s: float | None = None  # seconds from `VariantSwap.start` to the swap (None: not swapped)

    def describe(self) -> str:
        text = f"serving {self.variant}"
        if self.building:
            text += f"; building {self.building} in the background"
        if self.error:
            text += f"; background build failed: {self.error}"
        return text


class VariantSwap(Generic[T]):
    """Build a variant on a background thread and hand it to `install` once built (see the module doc)."""

    def __init__(self, serving: str) -> None:
        self._lock = threading.Lock()
        self._state = ServingState(serving)
        self._done = threading.Event()
        self._done.set()  # nothing under way
        self._thread: threading.Thread | None = None

    def state(self) -> ServingState:
        with self._lock:
            return self._state

    def start(self, variant: str, build: Callable[[], T], install: Callable[[T], None]) -> None:
        """Run `build()` on a daemon thread, then `install(result)` on it; the state names `variant` as
        building until then. One build at a time: starting a second while one runs is a programming error."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise RuntimeError(f"a background build of {self._state.building} is already under way")
            self._state = ServingState(self._state.variant, building=variant)
            self._done.clear()
            started = time.perf_counter()
            self._thread = threading.Thread(
                target=self._run,
                args=(variant, build, install, started),
                name=f"build-{variant}",
                daemon=True,
            )
            self._thread.start()

    def _run(
        self, variant: str, build: Callable[[], T], install: Callable[[T], None], started: float
    ) -> None:
        try:
            built = build()
            install(built)
            # The build's compiled graphs and compiler caches stay for the process's life: keep them out of
            # the serving threads' full collections (realtime.heap). No collection first: sessions may be
            # live, and the freeze itself scans nothing.
            freeze_long_lived(collect_first=False)
        except Exception as exc:  # any failure: keep serving the current variant, and say why
            reason = f"{type(exc).__name__}: {exc}"
            logger.exception(
                "background build failed: serving the current variant",
                extra={"code": "engine_variant_build_failed", "variant": variant, "reason": reason},
            )
            with self._lock:
                self._state = ServingState(self._state.variant, error=reason)
        else:
            swapped_at_s = time.perf_counter() - started
            with self._lock:
                self._state = ServingState(variant, swapped_at_s=round(swapped_at_s, 3))
            logger.info(
                "engine variant swapped in",
                extra={"variant": variant, "swapped_at_s": round(swapped_at_s, 1)},
            )
        finally:
            self._done.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until no build is under way (True) or `timeout_s` passed (False)."""
        return self._done.wait(timeout_s)
