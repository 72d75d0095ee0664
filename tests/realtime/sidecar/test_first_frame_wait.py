"""An utterance's start waits a tick or two for a frame 0 that its batch delivers late, audio and frames
together, instead of playing its first syllable over a held frame (`SessionRuntime._waits_for_frame0`,
`RuntimeConfig.first_frame_wait_ticks`); the render lane then renders that frame late rather than skip it
(`late_grace_s`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from realtime.sidecar.config import RuntimeConfig
from realtime.sidecar.render_lane import BatchCostModel, RenderLane
from tests.support.lane_sim import simulate

BUCKETS = (1, 2, 4, 8, 16)
# What the lane has measured; the simulated device below takes 2.5 times as long (a GPU whose batches ran
# long), so each utterance's frame 0, planned with the measured times, comes back after its tick.
MEASURED_MS = {1: 10.0, 2: 12.0, 4: 15.0, 8: 20.0, 16: 30.0}


async def _one_session(config: RuntimeConfig) -> tuple[int, int, list[float]]:
    result = await simulate(
        1,
        MEASURED_MS,
        config,
        duration_s=1.6,
        utterance_s=0.6,
        gap_s=0.3,
        max_batch_frames=16,
        burst_s=0.6,  # every frame's audio is there at once: the lead is the short first-frames one
        pipelined=True,
        device_ms_scale=2.5,
    )
    return result.dropped_frames, result.first_frame_wait_ticks, result.ttff_ms


async def test_a_late_frame_0_delays_the_start_by_a_tick_instead_of_being_dropped() -> None:
    dropped, waits, ttff_ms = await _one_session(RuntimeConfig())
    assert waits > 0
    assert dropped == 0
    # A wait is a 40 ms tick on the first utterance's TTFF, at most first_frame_wait_ticks of them (the later
    # utterances queue behind the one playing: the client keeps 0.6 s ahead).
    assert ttff_ms[0] < 40.0 + 2 * 40.0 + 80.0, ttff_ms


async def test_without_the_wait_the_same_late_frames_are_dropped() -> None:
    dropped, waits, _ = await _one_session(dataclasses.replace(RuntimeConfig(), first_frame_wait_ticks=0))
    assert waits == 0
    assert dropped > 0


def _lane(clock_s: float) -> RenderLane:
    model = BatchCostModel(BUCKETS, smoothing=1.0)
    for _ in range(2):  # the overload rules trust a bucket measured at least twice
        for frames, ms in MEASURED_MS.items():
            model.observe(frames, ms)

    def render(requests: object) -> list[np.ndarray]:
        return [np.zeros((2, 2, 3), np.uint8) for _ in requests]  # type: ignore[attr-defined]

    return RenderLane(render, max_batch_frames=16, buckets=BUCKETS, cost_model=model, clock=lambda: clock_s)


async def test_the_lane_renders_a_frame_within_its_grace_and_skips_one_past_it() -> None:
    """Due 20 ms ago: without grace the lane skips it (None: it would reach its tick late); with 80 ms of
    grace (its session waits two ticks for it) it renders it; due 100 ms ago, past the grace, it skips it."""
    lane = _lane(clock_s=1.0)
    try:

        async def render(due_s: float, grace_s: float) -> list[np.ndarray | None]:
            return await lane.render(
                due_s, lambda: ["frame-0"], frames=1, frame_period_s=0.04, late_grace_s=grace_s
            )

        assert await render(0.98, 0.0) == [None]
        rendered = await render(0.98, 0.08)
        assert rendered[0] is not None
        assert await render(0.90, 0.08) == [None]
    finally:
        lane.close()
