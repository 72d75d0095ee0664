"""Hands a publisher's video frames to the SDK on a thread of its own, in order, off the event loop.

LiveKit's `VideoSource.capture_frame` is a synchronous FFI call that returns only once libwebrtc has
taken the frame, and it waits meanwhile for the encoder thread to finish the frame before: about one
frame's encode time, most of it waiting rather than CPU (`bench.publish_cost` measures both). Made on the
event loop, those waits add up over a sidecar's sessions (25 a second each) and hold every session's
clock meanwhile. ctypes releases the GIL for the call, so one worker thread per publisher waits instead
and the loop goes on.

A worker `max_pending` frames behind refuses the next frame: the caller counts it as dropped, so an encoder
that cannot keep 25 fps never builds a backlog of stale frames. The default, 5 (200 ms of video at 25 fps),
lets the frames that fall due together after a stall of the loop through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

logger = logging.getLogger(__name__)


class FrameHandOff:
    """One worker thread that runs a publisher's frame captures in the order they were submitted."""

    def __init__(
        self,
        name: str,
        *,
        max_pending: int = 5,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.max_pending = max_pending
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"frames-{name}")
        self._on_error = on_error
        self._lock = threading.Lock()
        self._pending = 0
        self._last: Future[None] | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Captures submitted and not finished yet."""
        with self._lock:
            return self._pending

    def submit(self, capture: Callable[[], None]) -> bool:
        """Queue `capture` behind the ones before it; False (nothing queued) when the worker is
        `max_pending` behind or the hand-off is closed."""
        with self._lock:
            if self._closed or self._pending >= self.max_pending:
                return False
            self._pending += 1
        loop = asyncio.get_running_loop()
        future = self._executor.submit(capture)
        future.add_done_callback(lambda done: self._finished(done, loop))
        self._last = future
        return True

    def _finished(self, done: Future[None], loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._pending -= 1
        error = done.exception()
        if error is None:
            return
        # Reported on the loop: the publisher's counters are the loop's.
        if self._on_error is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_error, error)
        else:
            logger.warning("a frame capture failed: %s", error)

    async def aclose(self) -> None:
        """Refuse new captures and wait for those submitted (the source they use may be freed after)."""
        with self._lock:
            self._closed = True
        last = self._last
        if last is not None:
            with contextlib.suppress(Exception):  # its failure was reported through `on_error`
                await asyncio.wrap_future(last)
        # Every submitted capture ran before `last` (one worker, in order): nothing is left to wait for.
        self._executor.shutdown(wait=False)
