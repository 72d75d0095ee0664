"""The render lane pipelines batches over an engine's `render_async`: the next batch starts shortly before the
device finishes the one in flight (or when a full batch waits), and the one in flight is collected after
it."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from realtime.sidecar.render_lane import BatchCostModel, RenderLane

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64)


class FakeDevice:
    """Runs started renders one after another on its own thread, `device_ms` each: a GPU stream."""

    def __init__(self, device_ms: float, *, fail_on: int | None = None) -> None:
        self.device_ms = device_ms
        self.fail_on = fail_on  # a request value whose batch fails in `result()`
        self.log: list[tuple[str, list[int], float]] = []  # (start | result, request values, perf_counter)
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Handle | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def start(self, requests: Sequence[Any]) -> _Handle:
        handle = _Handle(self, [int(r) for r in requests])
        self.record("start", handle.values)
        self._queue.put(handle)
        return handle

    def record(self, what: str, values: list[int]) -> None:
        with self._lock:
            self.log.append((what, values, time.perf_counter()))

    def batches(self, what: str) -> list[list[int]]:
        with self._lock:
            return [values for kind, values, _ in self.log if kind == what]

    def order(self) -> list[tuple[str, list[int]]]:
        with self._lock:
            return [(kind, values) for kind, values, _ in self.log]

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while (handle := self._queue.get()) is not None:
            time.sleep(self.device_ms / 1000)
            handle.done.set()


class _Handle:
    def __init__(self, device: FakeDevice, values: list[int]) -> None:
        self.device = device
        self.values = values
        self.done = threading.Event()
        self.collected = False

    def ready(self) -> bool:
        return self.done.is_set()

    def device_ms(self) -> float | None:
        return self.device.device_ms if self.done.is_set() else None

    def host_ms(self) -> float | None:
        return 0.0 if self.collected else None

    def result(self) -> list[np.ndarray]:
        self.done.wait()
        self.collected = True
        self.device.record("result", self.values)
        if self.device.fail_on in self.values:
            raise RuntimeError("device fault")
        return [np.full((1, 1, 3), value, np.uint8) for value in self.values]


def _unused_render(requests: Sequence[Any]) -> list[np.ndarray]:
    raise AssertionError("a pipelined lane starts renders with start_render")


def _lane(device: FakeDevice, *, measured_device_ms: float | None, max_batch_frames: int = 64) -> RenderLane:
    model = BatchCostModel(BUCKETS)
    if measured_device_ms is not None:
        for bucket in BUCKETS:
            model.observe_device(bucket, measured_device_ms)
    return RenderLane(
        _unused_render,
        start_render=device.start,
        max_batch_frames=max_batch_frames,
        buckets=BUCKETS,
        cost_model=model,
    )


async def _frame(lane: RenderLane, value: int) -> list[np.ndarray | None]:
    return await lane.render(time.monotonic() + 10.0, lambda: [value], frames=1)


def _values(results: Sequence[list[np.ndarray | None]]) -> list[int]:
    return [int(image[0, 0, 0]) for result in results for image in result if image is not None]


async def test_frames_arriving_while_a_batch_is_on_the_device_start_together_just_before_it_finishes() -> (
    None
):
    device = FakeDevice(device_ms=150.0)
    lane = _lane(device, measured_device_ms=150.0)
    try:
        first = asyncio.ensure_future(_frame(lane, 1))
        await asyncio.sleep(0.02)
        later = []
        for value in (2, 3, 4, 5):  # arrive while frame 1 is on the device
            later.append(asyncio.ensure_future(_frame(lane, value)))
            await asyncio.sleep(0.015)
        results = await asyncio.gather(first, *later)
    finally:
        lane.close()
        device.stop()
    assert _values(results) == [1, 2, 3, 4, 5]  # each job got its own frame back
    # One batch of the four, not a batch of whatever had arrived right after the first started.
    assert device.batches("start") == [[1], [2, 3, 4, 5]]
    # Started before the first was collected: the host's work on batch 1 overlaps the device's on batch 2.
    assert device.order()[:3] == [("start", [1]), ("start", [2, 3, 4, 5]), ("result", [1])]
    starts = [at for kind, _, at in device.log if kind == "start"]
    assert starts[1] - starts[0] >= 0.1  # it waited for the device to be nearly done with batch 1
    assert lane.stats.frames_rendered == 5 and lane.stats.batches == 2
    assert lane.cost_model.device_ms(4) == pytest.approx(150.0)


async def test_a_full_batch_waiting_does_not_queue_on_the_device_and_batches_are_timed_without_queueing() -> (
    None
):
    """Started at once, a full batch would only wait on the device behind the batch in flight (frames none the
    sooner) and its measured time would double (seen on an H200: 64-frame batches timed at 2 x their device
    time,
    and the sidecar's capacity reported at half). It starts shortly before the device is done instead, and the
    lane times each batch by its own host and device time, not its wait behind the one before."""
    device = FakeDevice(device_ms=300.0)
    lane = _lane(device, measured_device_ms=300.0, max_batch_frames=4)
    try:
        first = asyncio.ensure_future(_frame(lane, 1))
        await asyncio.sleep(0.02)
        full = [asyncio.ensure_future(_frame(lane, value)) for value in (2, 3, 4, 5)]
        await asyncio.sleep(0.1)
        assert device.batches("start") == [[1]]  # the full batch waits for the device to be nearly done
        await asyncio.gather(first, *full)
    finally:
        lane.close()
        device.stop()
    assert device.order()[:3] == [("start", [1]), ("start", [2, 3, 4, 5]), ("result", [1])]
    starts = [at for kind, _, at in device.log if kind == "start"]
    assert starts[1] - starts[0] >= 0.25
    assert lane.cost_model.measured()[4] == pytest.approx(300.0, abs=30.0)


async def test_without_a_measured_device_time_batches_run_one_after_another() -> None:
    """Before the device time of a bucket is known, the lane cannot tell when to start early: it waits for the
    device, collects, then starts the next (as a lane without `start_render` does)."""
    device = FakeDevice(device_ms=60.0)
    lane = _lane(device, measured_device_ms=None)
    try:
        first = asyncio.ensure_future(_frame(lane, 1))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(_frame(lane, 2))
        await asyncio.gather(first, second)
    finally:
        lane.close()
        device.stop()
    assert device.order() == [("start", [1]), ("result", [1]), ("start", [2]), ("result", [2])]


async def test_a_failing_batch_fails_its_own_jobs_only() -> None:
    device = FakeDevice(device_ms=50.0, fail_on=1)
    lane = _lane(device, measured_device_ms=50.0)
    try:
        first = asyncio.ensure_future(_frame(lane, 1))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(_frame(lane, 2))
        with pytest.raises(RuntimeError, match="device fault"):
            await first
        assert _values([await second]) == [2]
    finally:
        lane.close()
        device.stop()


def test_closing_the_lane_still_hands_out_the_batch_in_flight() -> None:
    device = FakeDevice(device_ms=100.0)
    lane = _lane(device, measured_device_ms=100.0)

    async def scenario() -> list[np.ndarray | None]:
        job = asyncio.ensure_future(_frame(lane, 7))
        await asyncio.sleep(0.02)  # started, on the device
        await asyncio.get_running_loop().run_in_executor(None, lane.close)
        return await job

    try:
        assert _values([asyncio.run(scenario())]) == [7]
    finally:
        device.stop()


async def test_a_device_error_when_asking_for_readiness_fails_that_batch_not_the_lane() -> None:
    """`ready()` raising (a CUDA error surfaces in an event query) must not kill the lane thread: the batch is
    collected, its `result()` raises to its jobs, and the next batch renders."""
    device = FakeDevice(device_ms=30.0, fail_on=1)
    broken: list[bool] = []

    def start(requests: Sequence[Any]) -> _Handle:
        handle = device.start(requests)
        if 1 in handle.values:

            def ready() -> bool:
                broken.append(True)
                raise RuntimeError("device fault")

            handle.ready = ready  # type: ignore[method-assign]
        return handle

    model = BatchCostModel(BUCKETS)
    lane = RenderLane(_unused_render, start_render=start, buckets=BUCKETS, cost_model=model)
    try:
        with pytest.raises(RuntimeError, match="device fault"):
            await asyncio.wait_for(_frame(lane, 1), timeout=5.0)  # a dead lane thread would never answer
        assert _values([await asyncio.wait_for(_frame(lane, 2), timeout=5.0)]) == [2]
    finally:
        lane.close()
        device.stop()
    assert broken
