"""A CPU simulation of many realtime sessions on one render lane: the real `SessionRuntime` and `RenderLane`,
a fake engine whose batches only sleep for a known per-bucket time (no features, no images worth the name).

Each session's client streams a `utterance_s` utterance at real-time pace in 20 ms messages, ends it, waits
`gap_s`, and again, as `bench.sessions` does; what counts is how many speech frames missed their tick.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from realtime.ingest.formats import PLAYOUT_SAMPLES_PER_FRAME, TIMELINE_SAMPLES_PER_FRAME
from realtime.ingest.resample import ConvertedAudio
from realtime.outputs.base import PublisherStats, PublishTick
from realtime.sidecar.config import RuntimeConfig
from realtime.sidecar.engine_port import UtteranceStream
from realtime.sidecar.render_lane import BatchCostModel, RenderLane, bucket_for
from realtime.sidecar.runtime import SessionRuntime

CHUNK_MS = 20
LOOKAHEAD_FRAMES = (
    2  # a frame is ready once 80 ms of audio after it exist, as in the engine's feature framing
)
_FRAME = np.zeros((8, 8, 3), np.uint8)


class FakeStream:
    def __init__(self) -> None:
        self.samples = 0
        self.ended = False
        self.next_frame = 0  # as the engine's stream: frames are pulled in order

    def push_audio(self, samples_16k: np.ndarray) -> None:
        self.samples += int(samples_16k.size)

    def end(self) -> None:
        self.ended = True

    def ready_frame_count(self) -> int:
        if self.ended:
            return math.ceil(self.samples / TIMELINE_SAMPLES_PER_FRAME)
        return max(0, self.samples // TIMELINE_SAMPLES_PER_FRAME - LOOKAHEAD_FRAMES)

    def render_requests(self, frame_indices: list[int], ticks: list[int]) -> Sequence[Any]:
        if frame_indices and frame_indices[0] != self.next_frame:
            raise AssertionError(
                f"frames pulled out of order: expected {self.next_frame}, got {frame_indices[0]}"
            )
        self.next_frame += len(frame_indices)
        return list(frame_indices)

    def close(self) -> None:
        return None


class FakeAvatar:
    width_px = 8
    height_px = 8

    def idle_frame(self, tick: int) -> np.ndarray:
        return _FRAME


class FakeSessionEngine:
    avatar = FakeAvatar()
    lookahead_ms = 80

    def open_utterance(self) -> UtteranceStream:
        return FakeStream()


class SleepingDevice:
    """A fake engine with a device: a batch's `device_ms[bucket]` passes on a device thread (batches one after
    another, as on a GPU stream) and its `host_ms[bucket]` on the caller's thread in `result()` (frame
    assembly).
    `render` runs both in turn; `render_async` enqueues the device part and returns, for a pipelined lane."""

    def __init__(
        self,
        device_ms: Mapping[int, float],
        host_ms: Mapping[int, float],
        buckets: Sequence[int],
        *,
        jitter: float = 0.0,
        seed: int = 0,
    ) -> None:
        """`jitter`: each batch's device time is its bucket's times a factor drawn uniformly from
        [1 - jitter, 1 + jitter] (a real GPU's batches vary by 10-20 %)."""
        self.device_ms = dict(device_ms)
        self.host_ms = dict(host_ms)
        self.buckets = tuple(buckets)
        self.jitter = jitter
        self._rng = random.Random(seed)
        self._device_free_s = 0.0  # monotonic time the device finishes what it was given
        self._lock = threading.Lock()

    def render_async(self, requests: Sequence[Any]) -> _SleepingHandle:
        bucket = bucket_for(len(requests), self.buckets)
        with self._lock:
            device_ms = self.device_ms[bucket] * (1.0 + self._rng.uniform(-self.jitter, self.jitter))
            begins_s = max(time.monotonic(), self._device_free_s)
            self._device_free_s = begins_s + device_ms / 1000.0
            done_s = self._device_free_s
        return _SleepingHandle(len(requests), done_s, device_ms, self.host_ms[bucket])

    def render(self, requests: Sequence[Any]) -> list[np.ndarray]:
        return self.render_async(requests).result()


class _SleepingHandle:
    def __init__(self, frames: int, done_s: float, device_ms: float, host_ms: float) -> None:
        self._frames, self._done_s, self._device_ms, self._host_ms = frames, done_s, device_ms, host_ms
        self._collected = False

    def ready(self) -> bool:
        return time.monotonic() >= self._done_s

    def device_ms(self) -> float | None:
        return self._device_ms if self.ready() else None

    def host_ms(self) -> float | None:
        return self._host_ms if self._collected else None

    def result(self) -> list[np.ndarray]:
        time.sleep(max(0.0, self._done_s - time.monotonic()))
        time.sleep(self._host_ms / 1000.0)
        self._collected = True
        return [_FRAME for _ in range(self._frames)]


class NullPublisher:
    name = "null"

    def __init__(self) -> None:
        self._stats = PublisherStats(name=self.name, connected=True)

    async def start(self) -> None:
        return None

    async def publish(self, tick: PublishTick) -> None:
        self._stats.frames_published += 1

    def interrupt(self, idle_frame: np.ndarray) -> None:
        return None

    async def close(self) -> None:
        return None

    def stats(self) -> PublisherStats:
        return self._stats


@dataclass
class SimResult:
    sessions: int
    speech_frames: int
    dropped_frames: int
    ttff_ms: list[float]
    ttff_ms_by_session: list[list[float]]
    turn_ttff_ms: list[float]  # utterances that started a turn (`RuntimeSamples.turn_ttff_ms`)
    planned_budget_ms: list[float]
    lane_batches: int
    lane_mean_batch_frames: float
    lane_busy_fraction: float
    first_frames_jumped: int
    first_frames_displaced: int
    miss_frame_indices: list[
        int
    ]  # utterance frame index of each dropped frame (where in an utterance they fall)
    # pauses put between back-to-back utterances (`utterance_start_deferred_ticks`)
    deferred_ticks: int = 0
    clock_resyncs: int = 0  # the sessions' clocks restarted after an event-loop stall
    first_frame_wait_ticks: int = 0  # utterance starts held for a frame 0 still in the lane


async def _client(
    runtime: SessionRuntime,
    utterance_s: float,
    gap_s: float,
    stop_at_s: float,
    *,
    burst_s: float = 0.0,
    delay_s: float = 0.0,
) -> None:
    """`burst_s`: each utterance's first `burst_s` of audio arrives in one message (a TTS's first chunk), the
    rest
    in real time from then on, so the audio stays `burst_s` ahead of real time."""
    timeline = np.zeros(16_000 * CHUNK_MS // 1000, np.float32)
    playout = np.zeros(PLAYOUT_SAMPLES_PER_FRAME * CHUNK_MS // 40, np.float32)
    chunks = round(utterance_s * 1000 / CHUNK_MS)
    burst_chunks = min(chunks, round(burst_s * 1000 / CHUNK_MS))
    await asyncio.sleep(delay_s)
    while time.monotonic() < stop_at_s:
        started = time.monotonic()
        if burst_chunks:
            runtime.ingest(
                ConvertedAudio(np.tile(timeline, burst_chunks), np.tile(playout, burst_chunks)),
                "sim",
                started,
            )
        for index in range(burst_chunks, chunks):
            delay = started + (index - burst_chunks) * CHUNK_MS / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            runtime.ingest(ConvertedAudio(timeline, playout), "sim", started)
        runtime.end_utterance()
        await asyncio.sleep(gap_s)


async def simulate(
    sessions: int,
    cost_ms: Mapping[int, float],
    config: RuntimeConfig,
    *,
    duration_s: float = 4.0,
    utterance_s: float = 1.5,
    gap_s: float = 0.4,
    max_batch_frames: int = 32,
    seed_cost_model: bool = True,
    seed: int = 0,
    host_ms: Mapping[int, float] | None = None,
    pipelined: bool = False,
    burst_s: float | Sequence[float] = 0.0,
    client_delays_s: Sequence[float] | None = None,
    device_jitter: float = 0.0,
    device_ms_scale: float = 1.0,
) -> SimResult:
    """Run `sessions` concurrent sessions for `duration_s` (then drain); `seed_cost_model`: start from a lane
    that has measured every bucket already (a sidecar that has been up), else from nothing. A batch costs
    `cost_ms[bucket]` of device time, then `host_ms[bucket]` (default none) on the lane thread
    (`SleepingDevice`); `pipelined`: the lane gets the engine's `render_async`; `burst_s`: each utterance's
    first
    `burst_s` of audio arrives at once (`_client`; one value per session, or one for all); `client_delays_s`:
    how long each session's client waits before its first utterance (none: all start together);
    `device_jitter`: each batch's device time varies by up to that fraction (`SleepingDevice`);
    `device_ms_scale`: the device's batches take that multiple of `cost_ms` (the cost model is seeded with
    `cost_ms`: a GPU slower than the lane has measured)."""
    bursts_s = [burst_s] * sessions if isinstance(burst_s, float | int) else list(burst_s)
    buckets = tuple(sorted(cost_ms))
    host = dict(host_ms) if host_ms is not None else dict.fromkeys(buckets, 0.0)
    model = BatchCostModel(buckets)
    if seed_cost_model:
        for _ in range(2):  # skipping trusts a bucket that ran at least twice
            for bucket, ms in cost_ms.items():
                model.observe(bucket, ms + host[bucket])
                model.observe_device(bucket, ms)
    device = SleepingDevice(
        {bucket: ms * device_ms_scale for bucket, ms in cost_ms.items()},
        host,
        buckets,
        jitter=device_jitter,
        seed=seed,
    )
    lane = RenderLane(
        device.render,
        start_render=device.render_async if pipelined else None,
        max_batch_frames=max_batch_frames,
        buckets=buckets,
        cost_model=model,
    )
    runtimes = [
        SessionRuntime(f"sim-{index}", FakeSessionEngine(), [NullPublisher()], lane, config)  # type: ignore[list-item]
        for index in range(sessions)
    ]
    misses: list[int] = []
    for runtime in runtimes:
        _record_misses(runtime, misses)
    rng = random.Random(seed)
    started_s = time.monotonic()
    try:
        for runtime in runtimes:
            await runtime.start()
            await asyncio.sleep(rng.uniform(0.0, 0.04))  # clocks at arbitrary phases
        stop_at_s = time.monotonic() + duration_s
        delays_s = list(client_delays_s) if client_delays_s is not None else [0.0] * sessions
        await asyncio.gather(
            *(
                _client(runtime, utterance_s, gap_s, stop_at_s, burst_s=burst, delay_s=delay_s)
                for runtime, burst, delay_s in zip(runtimes, bursts_s, delays_s, strict=True)
            )
        )
        drain_until_s = time.monotonic() + 3.0
        while any(r.playing or r.timeline.pending_samples for r in runtimes):
            if time.monotonic() >= drain_until_s:
                break
            await asyncio.sleep(0.05)
    finally:
        for runtime in runtimes:
            await runtime.stop()
        lane.close()
    wall_s = time.monotonic() - started_s
    return SimResult(
        sessions=sessions,
        speech_frames=sum(r.counters.speech_frames for r in runtimes),
        dropped_frames=sum(r.counters.render_misses for r in runtimes),
        ttff_ms=[v for r in runtimes for v in r.samples.ttff_ms],
        ttff_ms_by_session=[list(r.samples.ttff_ms) for r in runtimes],
        turn_ttff_ms=[v for r in runtimes for v in r.samples.turn_ttff_ms],
        planned_budget_ms=[v for r in runtimes for v in r.samples.planned_budget_ms],
        lane_batches=lane.stats.batches,
        lane_mean_batch_frames=lane.stats.frames_rendered / max(1, lane.stats.batches),
        lane_busy_fraction=lane.stats.busy_s / wall_s,
        first_frames_jumped=lane.stats.first_frames_jumped,
        first_frames_displaced=lane.stats.first_frames_displaced,
        miss_frame_indices=misses,
        deferred_ticks=sum(r.counters.utterance_start_deferred_ticks for r in runtimes),
        clock_resyncs=sum(r.counters.clock_resyncs for r in runtimes),
        first_frame_wait_ticks=sum(r.counters.first_frame_wait_ticks for r in runtimes),
    )


def _record_misses(runtime: SessionRuntime, misses: list[int]) -> None:
    """Note the utterance frame index of every speech tick whose frame was not rendered in time."""
    speech_tick = runtime._speech_tick

    def recording(plan: Any, tick: int, deadline: float, wall_us: int) -> PublishTick:
        if plan.next_frame not in plan.rendered:
            misses.append(plan.next_frame)
        return speech_tick(plan, tick, deadline, wall_us)

    runtime._speech_tick = recording  # type: ignore[method-assign]
