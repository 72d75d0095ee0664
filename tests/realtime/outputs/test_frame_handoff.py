"""The video hand-off: captures run on a thread of their own, in order, bounded, drained before the source
is freed; the event loop never waits for one (the SDK's `capture_frame` blocks about one encode time)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from realtime.outputs.frame_handoff import FrameHandOff
from tests.realtime.outputs.test_publisher_drops import _AudioSource, connected_publisher
from tests.realtime.outputs.test_publisher_drops import speech_tick as tick_with_speech

GATE_TIMEOUT_S = 10.0


def _blocked_capture(gate: threading.Event, ran: list[int], index: int, threads: set[int]):  # type: ignore[no-untyped-def]
    def capture() -> None:
        threads.add(threading.get_ident())
        assert gate.wait(GATE_TIMEOUT_S)
        ran.append(index)

    return capture


def _wait_until(condition: Callable[[], bool]) -> None:
    deadline_s = time.monotonic() + GATE_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline_s
        time.sleep(0.002)


async def test_captures_run_in_order_off_the_loop_and_a_full_worker_refuses_the_next() -> None:
    gate, ran, threads = threading.Event(), list[int](), set[int]()
    handoff = FrameHandOff("test", max_pending=3)
    accepted = [handoff.submit(_blocked_capture(gate, ran, index, threads)) for index in range(4)]
    # The first capture blocks its thread (as the SDK's does while the encoder works): submit came back.
    assert accepted == [True, True, True, False]
    assert handoff.pending == 3 and ran == []
    gate.set()
    await asyncio.to_thread(_wait_until, lambda: len(ran) == 3)
    assert ran == [0, 1, 2]
    assert threads and threading.get_ident() not in threads
    assert handoff.submit(_blocked_capture(gate, ran, 3, threads))  # room again once the worker caught up
    await handoff.aclose()
    assert ran == [0, 1, 2, 3]


async def test_close_waits_for_the_captures_handed_over_and_refuses_new_ones() -> None:
    gate, ran, threads = threading.Event(), list[int](), set[int]()
    handoff = FrameHandOff("test")
    assert handoff.submit(_blocked_capture(gate, ran, 0, threads))
    assert handoff.submit(_blocked_capture(gate, ran, 1, threads))
    closing = asyncio.create_task(handoff.aclose())
    await asyncio.sleep(0.05)
    assert not closing.done()  # the source these captures use must outlive them
    gate.set()
    await asyncio.wait_for(closing, GATE_TIMEOUT_S)
    assert ran == [0, 1]
    assert not handoff.submit(_blocked_capture(gate, ran, 2, threads))


async def test_a_failed_capture_is_reported_on_the_loop() -> None:
    errors: list[tuple[str, int]] = []
    handoff = FrameHandOff("test", on_error=lambda error: errors.append((str(error), threading.get_ident())))

    def failing() -> None:
        raise RuntimeError("source closed")

    assert handoff.submit(failing)
    await handoff.aclose()
    await asyncio.sleep(0)  # the report is a call_soon_threadsafe callback
    assert errors == [("source closed", threading.get_ident())]


class _BlockingVideoSource:
    """Stands in for `rtc.VideoSource`: `capture_frame` holds its caller until the gate opens, as the SDK's
    holds it while the encoder works."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.frame_ids: list[int] = []

    def capture_frame(self, frame: object, *, timestamp_us: int, metadata: object) -> None:
        del frame, timestamp_us
        assert self.gate.wait(GATE_TIMEOUT_S)
        self.frame_ids.append(int(metadata.frame_id))  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        pass


async def test_the_publisher_hands_frames_over_without_waiting_and_drops_what_a_stuck_encoder_cant_take() -> (
    None
):
    # a clock that stands at every tick's capture time (deadline 0): no frame is late
    publisher = connected_publisher(_AudioSource("queue"), clock=lambda: 0.0)
    source = _BlockingVideoSource()
    publisher._video_source = source  # type: ignore[assignment]
    max_pending = publisher._frames.max_pending
    for index in range(max_pending + 2):
        due_now = tick_with_speech(index, 0)
        started_s = time.perf_counter()
        publisher._capture_video(due_now)
        # the loop does not wait for the blocked capture (generous bound for a loaded machine)
        assert time.perf_counter() - started_s < 1.0
    stats = publisher.stats()
    assert stats.frames_published == max_pending
    assert stats.frames_dropped == 2
    assert stats.extra["video_frames_dropped_busy"] == 2
    source.gate.set()
    await publisher.close()  # waits for the frames handed over
    assert source.frame_ids == list(range(max_pending))
    assert np.all(np.diff(source.frame_ids) == 1)


@pytest.mark.parametrize("max_pending", [1, 5])
async def test_the_bound_is_the_number_of_captures_not_yet_finished(max_pending: int) -> None:
    gate, ran, threads = threading.Event(), list[int](), set[int]()
    handoff = FrameHandOff("test", max_pending=max_pending)
    results = [
        handoff.submit(_blocked_capture(gate, ran, index, threads)) for index in range(max_pending + 1)
    ]
    assert results == [True] * max_pending + [False]
    gate.set()
    await handoff.aclose()
    assert ran == list(range(max_pending))
