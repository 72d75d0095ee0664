"""The session runtime runs on the clock it is given: ticks, deadlines, TTFF and the lane's job deadlines all
on
one injected clock, and the counters and samples it keeps are the ones its stats report reads."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from realtime.clock import Clock
from realtime.ingest.formats import PLAYOUT_SAMPLES_PER_FRAME, TIMELINE_SAMPLES_PER_FRAME
from realtime.ingest.resample import ConvertedAudio
from realtime.outputs.base import FrameKind
from realtime.sidecar.render_lane import RenderLane
from realtime.sidecar.runtime import SessionRuntime
from tests.realtime.sidecar.test_runtime import until
from tests.support.lane_sim import FakeSessionEngine
from tests.support.recording import RecordingPublisher

# Far from `time.monotonic()`: a deadline or timestamp taken from the process clock instead of the injected
# one
# would be this far off (every frame late and skipped, a TTFF of hours).
CLOCK_OFFSET_S = 10_000.0
UTTERANCE_FRAMES = 25


def _offset_clock() -> float:
    return time.monotonic() + CLOCK_OFFSET_S


def _render(requests: Sequence[Any]) -> list[np.ndarray]:
    return [np.full((8, 8, 3), 200, np.uint8) for _ in requests]


async def _speak_one_utterance(runtime: SessionRuntime, clock: Clock) -> RecordingPublisher:
    publisher = runtime.publishers[0]
    assert isinstance(publisher, RecordingPublisher)
    await runtime.start()
    try:
        timeline = np.zeros(UTTERANCE_FRAMES * TIMELINE_SAMPLES_PER_FRAME, np.float32)
        playout = np.zeros(UTTERANCE_FRAMES * PLAYOUT_SAMPLES_PER_FRAME, np.float32)
        runtime.ingest(ConvertedAudio(timeline, playout), "test", clock())
        runtime.end_utterance()
        await until(lambda: runtime.counters.speech_frames == UTTERANCE_FRAMES and not runtime.playing)
    finally:
        await runtime.stop()
    return publisher


async def test_the_runtime_ticks_on_the_lanes_clock_by_default() -> None:
    lane = RenderLane(_render, clock=_offset_clock)
    try:
        runtime = SessionRuntime("clocked", FakeSessionEngine(), [RecordingPublisher(8, 8)], lane)
        publisher = await _speak_one_utterance(runtime, _offset_clock)
    finally:
        lane.close()
    speech = publisher.speech_ticks()
    assert len(speech) == UTTERANCE_FRAMES
    # Every speech frame was rendered by its tick: the lane judged the runtime's deadlines on the same clock.
    assert runtime.counters.render_misses == 0 and lane.stats.frames_skipped_late == 0
    assert all(tick.kind is FrameKind.SPEECH and int(tick.frame_rgb[0, 0, 0]) == 200 for tick in speech)
    # Deadlines are readings of the injected clock, not of the process's monotonic clock.
    assert all(tick.deadline_s > CLOCK_OFFSET_S for tick in publisher.ticks)
    assert 0.0 < runtime.samples.ttff_ms[0] < 2_000.0, runtime.samples.ttff_ms
    assert max(runtime.samples.lateness_ms) < 1_000.0


async def test_the_stats_report_reads_the_counters_and_samples() -> None:
    lane = RenderLane(_render)
    try:
        runtime = SessionRuntime("counted", FakeSessionEngine(), [RecordingPublisher(8, 8)], lane)
        publisher = await _speak_one_utterance(runtime, lane.clock)
    finally:
        lane.close()
    stats = runtime.stats()
    counters = runtime.counters
    assert counters.speech_frames == stats.speech_frames == UTTERANCE_FRAMES
    assert counters.frames_published == stats.frames_published == len(publisher.ticks)
    assert counters.idle_frames == stats.idle_frames == len(publisher.ticks) - UTTERANCE_FRAMES
    assert stats.ttff_ms == runtime.samples.ttff_ms[0]
    assert stats.extra["render_misses"] == counters.render_misses
    assert stats.extra["underrun_ticks"] == counters.underrun_ticks
    assert stats.extra["interrupts"] == counters.interrupts == 0
