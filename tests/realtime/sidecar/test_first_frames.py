"""First frames jump the render lane's queue while the lane keeps deadlines (`RenderLane`, "First frames"),
and a
session whose audio arrived ahead of real time starts its utterance with the shorter lead that this allows."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from realtime.sidecar.config import RuntimeConfig
from realtime.sidecar.render_lane import BatchCostModel, RenderLane
from tests.support.lane_sim import simulate

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64)
# The lane's batch times with the compiled engine on an H200 (bench/results/sessions-h200-*.json, an earlier
# run).
H200_COMPILED_MS = {1: 9.3, 2: 15.0, 4: 20.0, 8: 27.5, 16: 49.0, 32: 86.0, 48: 123.0, 64: 158.0}


def _model(times_ms: dict[int, float]) -> BatchCostModel:
    model = BatchCostModel(BUCKETS, smoothing=1.0)
    for _ in range(2):  # skipping trusts a bucket that ran at least twice
        for frames, ms in times_ms.items():
            model.observe(frames, ms)
    return model


async def _batches(
    model: BatchCostModel,
    jobs: Sequence[tuple[str, float, int, bool]],
    *,
    max_batch_frames: int = 16,
    sources: dict[str, object] | None = None,
    taken: list[str] | None = None,
) -> tuple[list[list[str]], RenderLane]:
    """Queue render jobs (name, deadline, frames, first_frames) behind a generic job, at a clock fixed at 0 s;
    returns the names of the jobs in each batch the lane rendered, in order. `sources`: a job's feature source
    by name (jobs of one source are one utterance's stream); `taken` collects the names in the order the jobs
    built their requests."""
    batches: list[list[str]] = []

    def render(requests: Sequence[object]) -> list[np.ndarray]:
        names: list[str] = []
        for request in requests:
            if str(request) not in names:
                names.append(str(request))
        batches.append(names)
        return [np.zeros((2, 2, 3), np.uint8) for _ in requests]

    lane = RenderLane(
        render, max_batch_frames=max_batch_frames, buckets=BUCKETS, cost_model=model, clock=lambda: 0.0
    )
    loop = asyncio.get_running_loop()
    gate = asyncio.Event()
    try:
        blocker = asyncio.ensure_future(
            lane.call(0.0, lambda: asyncio.run_coroutine_threadsafe(gate.wait(), loop).result())
        )
        await asyncio.sleep(0.05)
        futures = [
            asyncio.ensure_future(
                lane.render(
                    deadline,
                    _named(name, frames, taken),
                    frames=frames,
                    first_frames=first,
                    source=(sources or {}).get(name),
                )
            )
            for name, deadline, frames, first in jobs
        ]
        await asyncio.sleep(0.05)
        gate.set()
        await blocker
        await asyncio.gather(*futures)
    finally:
        lane.close()
    return batches, lane


def _named(name: str, frames: int, taken: list[str] | None = None) -> Callable[[], list[str]]:
    def make_requests() -> list[str]:
        if taken is not None:
            taken.append(name)
        return [name] * frames

    return make_requests


# Batch times: 16 frames 50 ms, so a job that is put back holds when its deadline is >= 50 + 50 + 5 ms away.
_TIMES_MS = {4: 20.0, 8: 30.0, 16: 50.0}


async def test_first_frames_take_the_place_of_a_job_that_can_wait_one_batch() -> None:
    jobs = [
        ("urgent-a", 0.060, 4, False),
        ("urgent-b", 0.070, 4, False),
        ("later-c", 0.400, 4, False),
        ("later-d", 0.500, 4, False),
        ("first", 0.600, 4, True),  # the latest deadline of all: deadline order alone renders it last
    ]
    batches, lane = await _batches(_model(_TIMES_MS), jobs)
    assert batches == [["urgent-a", "urgent-b", "later-c", "first"], ["later-d"]]
    assert lane.stats.first_frames_jumped == 1
    assert lane.stats.first_frames_displaced == 1


async def test_without_the_mark_the_same_job_waits_its_turn_in_deadline_order() -> None:
    jobs = [
        ("urgent-a", 0.060, 4, False),
        ("urgent-b", 0.070, 4, False),
        ("later-c", 0.400, 4, False),
        ("later-d", 0.500, 4, False),
        ("first", 0.600, 4, False),
    ]
    batches, lane = await _batches(_model(_TIMES_MS), jobs)
    assert batches == [["urgent-a", "urgent-b", "later-c", "later-d"], ["first"]]
    assert lane.stats.first_frames_jumped == 0


async def test_first_frames_never_displace_a_job_that_would_then_miss_its_deadline() -> None:
    # Every queued job is due within 100 ms: one batch later (50 + 50 + 5 ms) would be too late for each of
    # them.
    jobs = [
        ("a", 0.060, 4, False),
        ("b", 0.080, 4, False),
        ("c", 0.090, 4, False),
        ("d", 0.100, 4, False),
        ("first", 0.600, 4, True),
    ]
    batches, lane = await _batches(_model(_TIMES_MS), jobs)
    assert batches == [["a", "b", "c", "d"], ["first"]]
    assert lane.stats.first_frames_displaced == 0


async def test_first_frames_do_not_grow_the_batch_into_a_bucket_that_misses_the_most_urgent_deadline() -> (
    None
):
    # 8 frames fit the bucket paid for; the 4 first frames would make it a 16-frame batch (50 ms) and the most
    # urgent job, due in 40 ms, late. Nothing in the batch can wait a batch: the first frames go next.
    jobs = [("a", 0.040, 4, False), ("b", 0.045, 4, False), ("first", 0.600, 4, True)]
    batches, _ = await _batches(_model(_TIMES_MS), jobs, max_batch_frames=64)
    assert batches == [["a", "b"], ["first"]]


async def test_a_streams_later_first_frames_never_join_a_batch_without_its_earlier_ones() -> None:
    """Regression (H200, 512² sessions): an utterance's first frames came as two jobs (frames 0..3 and 4..5);
    the batch had room for the 2-frame job but not the 4-frame one, so frames 4..5 took their features before
    0..3 and every later job of the stream failed. A stream's jobs now take their requests in order."""
    stream = object()  # the utterance's feature stream: the two jobs' shared source
    jobs = [
        ("a", 0.060, 6, False),  # 14 frames due too soon to wait a batch: 2 frames of room are left
        ("b", 0.080, 8, False),
        ("s0", 0.600, 4, True),  # does not fit
        ("s1", 0.760, 2, True),  # would fit, but must not go before s0
    ]
    taken: list[str] = []
    batches, _ = await _batches(_model(_TIMES_MS), jobs, sources={"s0": stream, "s1": stream}, taken=taken)
    assert taken.index("s0") < taken.index("s1")
    assert batches == [["a", "b"], ["s0", "s1"]]


async def test_an_idle_lane_has_no_backlog_after_batches_of_several_jobs_per_source() -> None:
    """The lane's count of frames in flight comes back to 0 (it once drifted up by the frames of every
    source's
    earlier jobs in a batch, so the planning budget counted a batch in flight that did not exist)."""
    lane = RenderLane(lambda requests: [np.zeros((2, 2, 3), np.uint8) for _ in requests], buckets=BUCKETS)
    sources = [object(), object()]
    try:
        for _ in range(3):
            await asyncio.gather(
                *(
                    lane.render(0.0, (lambda: [0, 0]), frames=2, source=source)
                    for source in sources
                    for _ in range(3)
                )
            )
        assert lane.stats.frames_rendered == 36
        assert lane._inflight_frames == 0
        assert lane.backlog_ms() == 0.0
    finally:
        lane.close()


async def test_sessions_whose_audio_arrives_ahead_show_their_first_frame_sooner_and_no_frame_is_dropped() -> (
    None
):
    """8 sessions on 1.3 x the H200's batch times (about two thirds of the lane's peak rate while all speak),
    6
    streaming in real time and 2 whose TTS sends each utterance's first 0.6 s at once. The load's planning
    budget
    is for frames that become ready in real time; frames that are ready already only need their batch. With
    the
    first-frame priority the 2 start with that lead; without it they wait the full budget like the others.
    Neither run drops frames."""
    cost_ms = {bucket: 1.3 * ms for bucket, ms in H200_COMPILED_MS.items()}
    bursts_s = [0.0] * 6 + [0.6] * 2
    options: dict[str, Any] = {"duration_s": 4.0, "utterance_s": 2.0, "gap_s": 0.5, "max_batch_frames": 64}
    off = await simulate(
        8, cost_ms, RuntimeConfig(first_frame_priority=False), burst_s=bursts_s, pipelined=True, **options
    )
    on = await simulate(8, cost_ms, RuntimeConfig(), burst_s=bursts_s, pipelined=True, **options)
    # 8 sessions × 2 utterances × 50 frames, and the start of a third (fewer when a stall delays the clients).
    assert min(off.speech_frames, on.speech_frames) > 700, (off.speech_frames, on.speech_frames)
    # None in runs alone; room for one stall of the whole process on a busy machine (every session then loses
    # the
    # same few utterance frames, mid-utterance), as in test_runtime's pipelined-lane simulation.
    assert off.dropped_frames <= off.speech_frames // 20, off
    assert on.dropped_frames <= on.speech_frames // 20, on
    assert 0 not in on.miss_frame_indices, on  # no first frame was lost to its shorter lead
    bursty_off = statistics.median(v for ttffs in off.ttff_ms_by_session[6:] for v in ttffs)
    bursty_on = statistics.median(v for ttffs in on.ttff_ms_by_session[6:] for v in ttffs)
    realtime_on = statistics.median(v for ttffs in on.ttff_ms_by_session[:6] for v in ttffs)
    # Measured 0.5 of each (252 ms against 508 and 471 ms, beside a load average of 8 on 2 cores).
    assert bursty_on < 0.7 * bursty_off, (bursty_on, bursty_off)
    # The real-time sessions keep the load's budget: their first frames could not be sooner without being
    # late.
    assert bursty_on < 0.7 * realtime_on, (bursty_on, realtime_on)
