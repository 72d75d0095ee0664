"""The render lane's cross-session batching: bucket sizes, deadline-based batch formation, admission
control."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from realtime.host import AvatarAsset
from realtime.sidecar.config import HostConfig
from realtime.sidecar.engine_port import EngineStatus
from realtime.sidecar.errors import NoFreeSlot
from realtime.sidecar.host import HostedSession, SidecarHost
from realtime.sidecar.render_lane import BACKGROUND_DEADLINE_S, BatchCostModel, RenderLane, bucket_for
from tests.support.fake_engine import NoEngine

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64)


def test_bucket_for_picks_the_smallest_bucket_that_holds_the_frames() -> None:
    assert [bucket_for(n, BUCKETS) for n in (1, 2, 3, 5, 17, 33, 49, 64, 65)] == [
        1,
        2,
        4,
        8,
        32,
        48,
        64,
        64,
        64,
    ]


def test_cost_model_knows_capacity_only_once_the_batching_frontier_was_measured() -> None:
    model = BatchCostModel(BUCKETS)
    assert model.capacity_sessions() is None
    model.observe(3, 30.0)  # a lightly loaded lane: small batches say nothing about large ones
    assert model.estimate_ms(4) == 30.0
    assert model.estimate_ms(8) == pytest.approx(60.0)  # scaled from below: pessimistic
    assert model.capacity_sessions() is None
    model.observe(16, 80.0)
    model.observe(48, 240.0)  # over the 160 ms budget: the frontier is known
    assert model.estimate_ms(2) == 30.0  # the nearest measured bucket above bounds a smaller one
    # Best rate within the budget: 16 frames / 80 ms = 200 fps; 80 % of it over 25 fps sessions = 6.
    assert model.sustainable_fps(160.0) == pytest.approx(200.0)
    assert model.capacity_sessions() == 6
    model.observe(16, 180.0)  # slower now: the moving average moves towards it
    assert model.measured()[16] == pytest.approx(80.0 + 0.2 * 100.0)


def test_skipping_trusts_only_buckets_that_ran_twice_and_their_fastest_recent_batch() -> None:
    model = BatchCostModel(BUCKETS, recent_batches=4)
    model.observe(1, 300.0)  # a first use, a hiccup: one slow batch
    assert model.fastest_recent_ms(1) is None  # not grounds to skip anything
    model.observe(1, 10.0)
    assert model.fastest_recent_ms(1) == 10.0  # while the moving average still says:
    assert model.estimate_ms(1) == pytest.approx(300.0 - 0.2 * 290.0)
    assert model.fastest_recent_ms(2) is None  # nothing larger ran twice
    for _ in range(2):
        model.observe(8, 40.0)
    assert model.fastest_recent_ms(2) == 40.0  # the nearest larger bucket bounds it
    for _ in range(4):
        model.observe(1, 50.0)  # the lane really is slower now: the window forgets the fast ones
    assert model.fastest_recent_ms(1) == 50.0


def test_one_slow_batch_does_not_make_the_lane_skip_the_frames_after_it() -> None:
    """A session at low load: frames due 40 ms ahead, one batch that took 300 ms. Judged by the moving average
    (242 ms after the next batch) every later frame would look late, be skipped, measure nothing, and the
    whole
    utterance would go unrendered."""
    clock = _ManualClock()
    model = BatchCostModel(BUCKETS)
    model.observe(1, 300.0)
    rendered: list[int] = []

    def render(requests: Sequence[Any]) -> list[np.ndarray]:
        rendered.extend(int(r) for r in requests)
        return [np.zeros((1, 1, 3), np.uint8) for _ in requests]

    lane = RenderLane(render, max_batch_frames=64, buckets=BUCKETS, cost_model=model, clock=clock)

    async def frames() -> list[list[np.ndarray | None]]:
        return [
            await lane.render(clock.now_s + 0.04, _requests_from(k), frames=1, frame_period_s=0.04)
            for k in range(5)
        ]

    try:
        results = asyncio.run(frames())
    finally:
        lane.close()
    assert rendered == [0, 1, 2, 3, 4]
    assert all(result[0] is not None for result in results)
    assert lane.stats.frames_skipped_late == 0


def _blocked_lane(
    lane: RenderLane, loop: asyncio.AbstractEventLoop, gate: asyncio.Event
) -> asyncio.Future[object]:
    """Occupy the lane with a generic job until `gate` is set, so render jobs queue up behind it."""
    return asyncio.ensure_future(
        lane.call(0.0, lambda: asyncio.run_coroutine_threadsafe(gate.wait(), loop).result())
    )


async def _run_batches(
    model: BatchCostModel, jobs: Sequence[tuple[float, int]], *, now_s: float = 0.0
) -> tuple[list[int], RenderLane]:
    """Queue render jobs (deadline, frames) behind a blocker; returns the batch sizes the lane rendered."""
    batches: list[int] = []

    def render(requests: Sequence[object]) -> list[np.ndarray]:
        batches.append(len(requests))
        return [np.zeros((2, 2, 3), np.uint8) for _ in requests]

    lane = RenderLane(render, max_batch_frames=64, buckets=BUCKETS, cost_model=model, clock=lambda: now_s)
    gate = asyncio.Event()
    try:
        blocker = _blocked_lane(lane, asyncio.get_running_loop(), gate)
        await asyncio.sleep(0.05)
        futures = [
            asyncio.ensure_future(lane.render(deadline, _requests(frames), frames=frames))
            for deadline, frames in jobs
        ]
        await asyncio.sleep(0.05)
        gate.set()
        await blocker
        await asyncio.gather(*futures)
    finally:
        lane.close()
    return batches, lane


def _requests(count: int) -> Callable[[], list[int]]:
    return lambda: list(range(count))


def _requests_from(first: int) -> Callable[[], list[int]]:
    return lambda: [first]


def _seeded_model(times_ms: dict[int, float]) -> BatchCostModel:
    model = BatchCostModel(BUCKETS, smoothing=1.0)
    for _ in range(2):  # skipping trusts a bucket that ran at least twice
        for frames, ms in times_ms.items():
            model.observe(frames, ms)
    return model


async def test_a_batch_stops_growing_where_the_larger_bucket_would_miss_the_most_urgent_deadline() -> None:
    model = _seeded_model({4: 10.0, 8: 100.0, 16: 120.0})
    # Now is 0 s. The urgent job (due in 50 ms) makes it alone at bucket 4 (10 ms) but not at bucket 8 (100
    # ms).
    batches, lane = await _run_batches(model, [(0.05, 4), (0.5, 4), (0.5, 4)])
    assert batches == [4, 8]
    assert lane.stats.batches_cut_by_deadline == 1


async def test_frames_that_fit_the_bucket_already_paid_for_join_regardless_of_deadline() -> None:
    model = _seeded_model({4: 10.0, 8: 100.0})
    # 2 + 1 + 1 frames stay in bucket 4: the engine pads to 4 anyway, so they cost nothing extra.
    batches, _ = await _run_batches(model, [(0.05, 2), (0.5, 1), (0.5, 1), (0.5, 4)])
    assert batches == [4, 4]


async def test_loose_deadlines_batch_everything_up_to_the_frame_limit() -> None:
    model = _seeded_model({4: 10.0, 8: 100.0, 16: 120.0})
    batches, lane = await _run_batches(model, [(1.0, 4), (1.0, 4), (1.0, 4)])
    assert batches == [12]
    assert lane.stats.batches_cut_by_deadline == 0


async def test_a_head_that_is_late_anyway_does_not_shrink_the_batch() -> None:
    # Cutting for a job that misses even alone would only lower throughput and make the others late too.
    model = _seeded_model({4: 10.0, 8: 100.0, 16: 120.0})
    batches, _ = await _run_batches(model, [(0.001, 4), (0.05, 4), (0.05, 4)])
    assert batches == [12]


async def test_frames_due_before_their_batch_could_finish_are_not_rendered() -> None:
    """Overload: frames that would miss their ticks anyway are taken (features consumed) but not rendered."""
    model = _seeded_model({1: 10.0, 4: 10.0, 8: 100.0, 16: 120.0})
    rendered: list[list[int]] = []

    def render(requests: Sequence[Any]) -> list[np.ndarray]:
        rendered.append([int(r) for r in requests])
        return [np.full((1, 1, 3), int(r), dtype=np.uint8) for r in requests]

    lane = RenderLane(render, max_batch_frames=64, buckets=BUCKETS, cost_model=model, clock=lambda: 0.0)
    gate = asyncio.Event()
    taken: list[str] = []

    def job(name: str, frames: int) -> Callable[[], list[int]]:
        def make() -> list[int]:
            taken.append(name)
            return [10 * (ord(name) - ord("K")) + k for k in range(frames)]

        return make

    try:
        blocker = _blocked_lane(lane, asyncio.get_running_loop(), gate)
        await asyncio.sleep(0.05)
        period_s = 0.04
        # Now is 0 s. L's frames were due 0.5 s ago; M's are due at 5, 45, 85, 125 ms; N's from 1 s on.
        late, urgent, loose = (
            asyncio.ensure_future(
                lane.render(due_s, job(name, frames), frames=frames, frame_period_s=period_s)
            )
            for name, due_s, frames in (("L", -0.5, 2), ("M", 0.005, 4), ("N", 1.0, 4))
        )
        await asyncio.sleep(0.05)
        gate.set()
        await blocker
        results = await asyncio.gather(late, urgent, loose)
    finally:
        lane.close()
    assert taken == ["L", "M", "N"]  # every job's features were taken, in order
    # A batch of 5 takes 100 ms (bucket 8): only M's last frame (due at 125 ms) and N's make it.
    assert rendered == [[23, 30, 31, 32, 33]]
    assert [[None if image is None else int(image[0, 0, 0]) for image in images] for images in results] == [
        [None, None],
        [None, None, None, 23],
        [30, 31, 32, 33],
    ]
    assert lane.stats.frames_skipped_late == 5 and lane.stats.frames_rendered == 5


async def test_the_lane_measures_its_batches_and_prepares_each_batch_once() -> None:
    prepared: list[list[tuple[object, int]]] = []
    lane = RenderLane(
        lambda requests: [np.zeros((2, 2, 3), np.uint8) for _ in requests],
        buckets=BUCKETS,
        prepare=lambda jobs: prepared.append(list(jobs)),
    )
    gate = asyncio.Event()
    try:
        blocker = _blocked_lane(lane, asyncio.get_running_loop(), gate)
        await asyncio.sleep(0.05)
        first = asyncio.ensure_future(lane.render(1.0, lambda: [1, 2], frames=2, source="stream-a"))
        second = asyncio.ensure_future(lane.render(1.0, lambda: [3], frames=1, source="stream-b"))
        await asyncio.sleep(0.05)
        gate.set()
        await blocker
        assert [len(r) for r in await asyncio.gather(first, second)] == [2, 1]
    finally:
        lane.close()
    assert prepared == [[("stream-a", 2), ("stream-b", 1)]]
    assert set(lane.cost_model.measured()) == {4}  # 3 frames -> bucket 4


async def test_host_capacity_follows_the_measured_render_capacity_and_refuses_sessions_beyond_it() -> None:
    host = SidecarHost(NoEngine(), HostConfig(slots_total=10))  # type: ignore[arg-type]
    try:
        assert host.capacity().slots_total == 10  # nothing measured yet: the configured slots
        for frames, ms in ((16, 80.0), (48, 240.0)):
            host.lane.cost_model.observe(frames, ms)
        capacity = host.capacity()
        assert (capacity.slots_total, capacity.slots_free) == (6, 6)
        for index in range(6):
            host.sessions[f"s{index}"] = HostedSession(f"s{index}")
        assert host.capacity().slots_free == 0
        with pytest.raises(NoFreeSlot, match="6 slots"):
            await host.prepare_avatar(
                "s6", AvatarAsset(Path("never-read.zip"), "frames_zip", ""), lambda _p: None
            )
    finally:
        await host.close()


class _TimedEngine(NoEngine):
    """Warms up once and reports the batch times it measured then."""

    def __init__(self) -> None:
        self.warm = False

    def warm_up(self) -> bool:
        already, self.warm = self.warm, True
        return already

    def warm_up_batch_ms(self) -> dict[int, float]:
        return {1: 8.0, 16: 80.0, 48: 240.0}

    def info(self) -> EngineStatus:
        return EngineStatus(name="timed", device="cpu", warm=self.warm)


async def test_a_fresh_sidecar_knows_its_capacity_from_the_warm_up() -> None:
    """Before, admission control knew nothing until live sessions had made the lane run its largest
    batches."""
    host = SidecarHost(_TimedEngine(), HostConfig(slots_total=10))  # type: ignore[arg-type]
    try:
        assert host.capacity().slots_total == 10
        assert not (await host.warm_up()).already_warm
        assert host.capacity().slots_total == 6  # 16 frames / 80 ms = 200 fps x 0.8 / 25 fps
        assert host.lane.cost_model.fastest_recent_ms(1) is None  # one timing is no grounds to skip frames
        await host.warm_up()  # already warm: nothing is observed twice
        assert host.lane.cost_model.fastest_recent_ms(16) is None
    finally:
        await host.close()


async def test_a_warm_engine_answers_warm_up_without_waiting_for_the_lane() -> None:
    """Every session start asks for a warm-up; once the engine is warm the answer must not queue behind the
    lane's work (live sessions' frames, other starts' avatar preparations)."""
    host = SidecarHost(_TimedEngine(), HostConfig(slots_total=10))  # type: ignore[arg-type]
    release = threading.Event()
    try:
        assert not (await host.warm_up()).already_warm  # cold: it runs on the lane
        busy = asyncio.ensure_future(host.lane.call(BACKGROUND_DEADLINE_S, lambda: release.wait(10.0)))
        await asyncio.sleep(0.05)  # the lane thread is now blocked in that call
        answer = await asyncio.wait_for(host.warm_up(), timeout=2.0)
        assert answer.already_warm and answer.engine == "timed"
        assert not busy.done()  # answered while the lane was still busy
        release.set()
        await busy
    finally:
        release.set()
        await host.close()


def test_an_expected_speech_duty_scales_the_admitted_sessions() -> None:
    """Idle frames cost the lane nothing: sessions that speak half the time need half the render rate."""
    host = SidecarHost(NoEngine(), HostConfig(slots_total=20, speech_duty=0.5))  # type: ignore[arg-type]
    try:
        for frames, ms in ((16, 80.0), (48, 240.0)):
            host.lane.cost_model.observe(frames, ms)
        assert host.capacity().slots_total == 12  # 200 frames/s x 0.8 headroom / (25 fps x 0.5) = 12.8
    finally:
        host.lane.close()


# ---- the planning budget: how far ahead sessions plan an utterance's first tick
# ---------------------------------

# A fake engine's known per-batch costs: 15 ms at 1 frame, 30 ms at 4, 45 ms at 8, 70 ms at 16, 105 ms at 32.
_KNOWN_COST_MS = {1: 15.0, 2: 22.0, 4: 30.0, 8: 45.0, 16: 70.0, 32: 105.0}


class _ManualClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def _idle_lane(model: BatchCostModel, clock: Callable[[], float] = lambda: 0.0) -> RenderLane:
    return RenderLane(
        lambda requests: [np.zeros((2, 2, 3), np.uint8) for _ in requests],
        max_batch_frames=32,
        buckets=BUCKETS,
        cost_model=model,
        clock=clock,
    )


def test_the_planning_budget_is_the_minimum_until_the_lane_has_measured_a_batch() -> None:
    lane = _idle_lane(BatchCostModel(BUCKETS))
    try:
        for index in range(16):
            lane.set_speaking(f"s{index}", True)
        assert lane.steady_batch_ms(16) is None
        assert lane.planning_budget_ms(min_ms=40.0, max_ms=240.0) == 40.0
    finally:
        lane.close()


def test_the_planning_budget_stays_at_the_minimum_for_one_session_and_moves_out_with_the_load() -> None:
    lane = _idle_lane(_seeded_model(_KNOWN_COST_MS))
    try:
        budgets: dict[int, float] = {}
        for sessions in (1, 4, 8, 20):
            for index in range(sessions):
                lane.set_speaking(f"s{index}", True)
            assert lane.speaking_sessions() == sessions
            budgets[sessions] = lane.planning_budget_ms(min_ms=40.0, max_ms=1000.0, safety_factor=2.0)
        # 1 session: a frame alone (15 ms) keeps up; 2 × 15 ms is under the minimum, which holds (TTFF as
        # before).
        assert lane.steady_batch_ms(1) == 15.0 and budgets[1] == 40.0
        # The lane settles on the smallest bucket that keeps up with 25 % headroom: 4 sessions -> bucket 4
        # (4·30 <= 0.75·4·40), 2 batches of 30 ms.
        assert lane.steady_batch_ms(4) == 30.0 and budgets[4] == pytest.approx(60.0)
        # 8 sessions: 8 frames take 45 ms > 40 ms, so frames pile up past 8; bucket 16 (8·70 > 0.75·16·40) has
        # no headroom either: bucket 32, 105 ms.
        assert lane.steady_batch_ms(8) == 105.0 and budgets[8] == pytest.approx(210.0)
        # 20 sessions overload every bucket up to the 32-frame limit: the largest batch's time (its backlog
        # grows).
        assert lane.steady_batch_ms(20) == 105.0 and budgets[20] == pytest.approx(210.0)
        assert lane.planning_budget_ms(min_ms=40.0, max_ms=240.0, safety_factor=3.0) == 240.0  # clamped
    finally:
        lane.close()


def test_sessions_count_as_speaking_until_a_hold_after_their_speech_ends() -> None:
    clock = _ManualClock()
    lane = RenderLane(lambda requests: [], buckets=BUCKETS, clock=clock, speaking_hold_s=1.0)
    try:
        lane.set_speaking("a", True)
        lane.set_speaking("b", True)
        lane.set_speaking("never-spoke", False)  # a session without speech is not counted
        assert lane.speaking_sessions() == 2
        clock.now_s = 10.0
        lane.set_speaking("a", False)  # a pause between sentences: still counted for a while
        clock.now_s = 10.9
        assert lane.speaking_sessions() == 2
        clock.now_s = 11.1
        assert lane.speaking_sessions() == 1
        lane.set_speaking("a", True)
        assert lane.speaking_sessions() == 2
    finally:
        lane.close()


async def test_the_planning_budget_adds_the_queued_backlog() -> None:
    lane = _idle_lane(_seeded_model(_KNOWN_COST_MS))
    gate = asyncio.Event()
    try:
        for index in range(4):
            lane.set_speaking(f"s{index}", True)
        idle_budget_ms = lane.planning_budget_ms(min_ms=40.0, max_ms=1000.0)
        assert lane.backlog_ms() == 0.0
        blocker = _blocked_lane(lane, asyncio.get_running_loop(), gate)
        await asyncio.sleep(0.05)
        # 40 frames queued behind the blocker: a full 32-frame batch (105 ms) + 8 frames (45 ms).
        futures = [asyncio.ensure_future(lane.render(1.0, _requests(4), frames=4)) for _ in range(10)]
        await asyncio.sleep(0.05)
        assert lane.backlog_ms() == pytest.approx(150.0)
        assert lane.planning_budget_ms(min_ms=40.0, max_ms=1000.0) == pytest.approx(idle_budget_ms + 150.0)
        gate.set()
        await blocker
        await asyncio.gather(*futures)
    finally:
        lane.close()


def _slow_render(requests: Sequence[object]) -> list[np.ndarray]:
    time.sleep(0.06)  # a lane slower than it measured before: 60 ms a batch
    return [np.zeros((2, 2, 3), np.uint8) for _ in requests]


def test_the_planning_budget_follows_the_batches_the_lane_really_ran_lately() -> None:
    clock = _ManualClock()
    model = BatchCostModel(BUCKETS, smoothing=0.0)  # frozen at its first measurement: 10 ms a frame
    model.observe(1, 10.0)
    lane = RenderLane(
        _slow_render,
        buckets=BUCKETS,
        cost_model=model,
        clock=clock,
    )
    try:
        lane.set_speaking("a", True)
        assert lane.planning_budget_ms(min_ms=40.0, max_ms=1000.0) == 40.0  # 2 × 10 ms: the minimum
        asyncio.run(lane.render(1.0, _requests(1), frames=1))  # the lane is slower now: >= 60 ms a batch
        assert (recent_ms := lane.recent_batch_ms()) is not None and recent_ms >= 60.0
        assert lane.planning_budget_ms(min_ms=40.0, max_ms=1000.0) == pytest.approx(2 * recent_ms)
        clock.now_s += 3.0  # those batches are history: back to what the cost model says
        assert lane.recent_batch_ms() is None
    finally:
        lane.close()
