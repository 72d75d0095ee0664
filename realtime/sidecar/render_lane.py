"""The process's one render lane: every session's engine work, earliest deadline first, batched.

Rules, and why:

- One thread runs every engine call (features, rendering, avatar preparation, warm-up): the engine is
  shared by all sessions and driven from one thread (one GPU stream, CUDA graphs), off the event loop
  that runs the session clocks.
- Batching: a batch takes the most urgent job, then more jobs in deadline order while they fit
  `max_batch_frames` and either the bucket already paid for (the engine pads to the next of `buckets`)
  or a larger bucket that still meets the urgent deadline. It never waits for a batch to fill.
- Pipelining: with the engine's `start_render`, the next batch starts shortly before the device should
  finish the one in flight, so the device never waits for the host and the next batch still gathers
  every frame that arrived meanwhile. Starting earlier would only queue on the device.
- Overload: frames that a batch would finish after their tick are skipped (their features are still
  taken; the caller holds its frame): rendering them would make the next frames late too. Skipping
  judges by the fastest recent batch of the bucket, measured at least twice, so that one slow batch does
  not make the lane skip everything after it. A job's `late_grace_s` moves that line: an utterance's start
  waits a tick or two for its frame 0, so that frame is rendered late rather than skipped.
- First frames (of a new utterance planned with less lead than the load's budget) jump the queue, but
  never push the batch into a bucket that misses the most urgent deadline nor displace a job that could
  not wait one batch more, and never ahead of their own stream's earlier jobs: a stream's features are
  pulled in order, so one source's jobs take their requests in deadline order, skipped ones included.
  Their lead is the shortest with which the batching rule, run ahead on the cost model
  (`first_frames_budget_ms`, `lane_forecast`), renders them by their ticks without making a queued frame
  late that would be in time without them.
- Backlog: a full batch or more of frames due within two full batches' time makes the lane behind, and
  then only throughput counts (full batches, no cutting for the most urgent deadline). Frames due later
  (a TTS burst's) and first frames do not count: a burst of utterances that start together would
  otherwise turn off the cutting that the first planned of them counted on.
- Admission and planning: `BatchCostModel` keeps the measured batch time per bucket;
  `capacity_sessions` turns it into admission control, `planning_budget_ms` into how far ahead a session
  plans an utterance (the batch in flight plus its own, times a safety factor, plus the backlog).
  Sessions count as speaking from their first audio until `speaking_hold_s` after it ends, so that a
  burst of starts and the pauses within a turn are both seen.

The measurements behind these rules: bench/results/runtime-notes.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from realtime.clock import Clock, monotonic_clock
from realtime.engine.protocol import RenderedFrames, RenderHandle
from realtime.sidecar.lane_forecast import ForecastJob, LaneCosts, bucket_for, forecast_ready_s

logger = logging.getLogger(__name__)

T = TypeVar("T")
RenderFn = Callable[[Sequence[Any]], list[np.ndarray]]
StartRenderFn = Callable[[Sequence[Any]], RenderHandle]
PrepareFn = Callable[[Sequence[tuple[object, int]]], Any]
BACKGROUND_DEADLINE_S = math.inf  # preparation/warm-up: only when no frame is waiting
# realtime.engine.accel.DEFAULT_BATCH_BUCKETS (no torch import here)
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64)
FRAME_PERIOD_MS = 40.0  # one 25-fps tick: a speaking session adds one ready frame per period
# The lane never waits for a batch to fill, and one frame over a bucket costs the next bucket: near full load
# it runs larger, padded batches than the bare rate suggests. A bucket counts as keeping up only with this
# headroom.
STEADY_UTILIZATION = 0.75
# the batches `planning_budget_ms` averages: the lane's current load, as it runs
RECENT_BATCHES_WINDOW_S = 2.0
# Pipelining (see "Pipelining" above): the next batch starts this long before the device should finish the one
# in flight: FACTOR x the measured host time of a start + MARGIN. While waiting, the lane re-checks this
# often.
START_LEAD_FACTOR = 1.5
START_LEAD_MARGIN_MS = 1.0
START_HOST_SMOOTHING = 0.2
IN_FLIGHT_POLL_S = 0.002
BACKLOG_HORIZON_BATCHES = 2.0  # see `_take_batch`: how far ahead queued frames count as the lane being behind


def smoothed(previous: float | None, value: float, smoothing: float) -> float:
    """An exponential moving average's next value (`value` itself as the first)."""
    return value if previous is None else previous + smoothing * (value - previous)


class BatchCostModel:
    """Measured wall time of a lane batch (features + render) per bucket: an exponential moving average
    (planning, capacity) and the last `recent_batches` times (what skipping late frames judges by)."""

    def __init__(
        self, buckets: Sequence[int] = DEFAULT_BUCKETS, *, smoothing: float = 0.2, recent_batches: int = 8
    ) -> None:
        self.buckets = tuple(buckets)
        self._smoothing = smoothing
        self._ms: dict[int, float] = {}
        self._device_ms: dict[int, float] = {}
        self._recent_ms: dict[int, deque[float]] = {}
        self._recent_batches = recent_batches
        self._lock = threading.Lock()

    def observe(self, frames: int, elapsed_ms: float) -> None:
        bucket = bucket_for(max(1, frames), self.buckets)
        with self._lock:
            self._smooth_into(self._ms, bucket, elapsed_ms)
            self._recent_ms.setdefault(bucket, deque(maxlen=self._recent_batches)).append(elapsed_ms)

    def _smooth_into(self, table: dict[int, float], bucket: int, value_ms: float) -> None:
        table[bucket] = smoothed(table.get(bucket), value_ms, self._smoothing)

    def fastest_recent_ms(self, frames: int) -> float | None:
        """The fastest recent batch of `frames`' bucket (or, unmeasured, of the nearest larger bucket: an
        upper bound), from buckets that ran at least twice; None otherwise. Optimistic on purpose: it decides
        which frames are not rendered at all, so it must not trust one slow batch."""
        bucket = bucket_for(max(1, frames), self.buckets)
        with self._lock:
            known = {b: min(times) for b, times in self._recent_ms.items() if len(times) >= 2}
        if bucket in known:
            return known[bucket]
        above = [b for b in known if b > bucket]
        return known[min(above)] if above else None

    def measured(self) -> dict[int, float]:
        with self._lock:
            return dict(self._ms)

    def observe_device(self, frames: int, device_ms: float) -> None:
        """The device time alone of a batch (no host work): when a pipelined lane starts the next batch."""
        bucket = bucket_for(max(1, frames), self.buckets)
        with self._lock:
            self._smooth_into(self._device_ms, bucket, device_ms)

    def device_ms(self, frames: int) -> float | None:
        bucket = bucket_for(max(1, frames), self.buckets)
        with self._lock:
            return self._device_ms.get(bucket)

    def estimate_ms(self, frames: int) -> float | None:
        """The batch time of `frames`' bucket: measured; else the nearest measured larger bucket's (an upper
        bound); else the largest measured smaller bucket's scaled by size (pessimistic: batching is
        sublinear); None before any measurement."""
        bucket = bucket_for(max(1, frames), self.buckets)
        with self._lock:
            if bucket in self._ms:
                return self._ms[bucket]
            above = [b for b in self._ms if b > bucket]
            if above:
                return self._ms[min(above)]
            below = [b for b in self._ms if b < bucket]
            if below:
                largest = max(below)
                return self._ms[largest] * bucket / largest
        return None

    def sustainable_fps(self, latency_budget_ms: float) -> float | None:
        """The best frames/s over measured buckets whose batch time fits `latency_budget_ms` (None:
        unknown)."""
        measured = self.measured()
        # Known only once the frontier is: a bucket over the budget, or the largest bucket, was measured.
        # Small batches alone (a lightly loaded lane) say nothing about how far batching scales.
        frontier_known = (
            any(ms > latency_budget_ms for ms in measured.values()) or self.buckets[-1] in measured
        )
        if not frontier_known:
            return None
        rates = [b * 1000.0 / ms for b, ms in measured.items() if 0 < ms <= latency_budget_ms]
        return max(rates) if rates else 0.0

    def capacity_sessions(
        self, *, fps_per_session: float = 25.0, latency_budget_ms: float = 160.0, headroom: float = 0.8
    ) -> int | None:
        """Sessions (all speaking at once) the lane sustains with `headroom` to spare; None before
        measurements.

        The budget bounds how long one batch may take: a frame waits for the batch in flight and then its own,
        within the session's planning budget (`RuntimeConfig.max_batch_ms`).
        """
        fps = self.sustainable_fps(latency_budget_ms)
        if fps is None:
            return None
        return max(0, math.floor(fps * headroom / fps_per_session))


@dataclass(order=True)
class _Job:
    deadline_s: float
    sequence: int
    fn: Callable[[], Any] = field(compare=False)  # generic: the result; render: the requests
    future: Future[Any] = field(compare=False)
    is_render: bool = field(compare=False, default=False)
    frames: int = field(compare=False, default=1)  # render: frames the job will ask for (its size in a batch)
    source: object | None = field(compare=False, default=None)  # render: the feature source, for `prepare`
    # render: frame k is due at deadline + k·period
    frame_period_s: float | None = field(compare=False, default=None)
    first_frames: bool = field(compare=False, default=False)  # render: jumps the queue (see "First frames")
    # render: how late past its due time a frame may still be shown (an utterance's start waits that long
    # for its frame 0), so the overload rules render it rather than skip it
    late_grace_s: float = field(compare=False, default=0.0)


@dataclass
class _InFlight:
    """A batch whose render was started and not yet collected."""

    batch: list[tuple[_Job, Sequence[Any]]]  # the jobs and the requests each built
    keep: list[list[bool]]  # per job, which requests went to the engine
    requests: int  # requests rendered
    frames: int  # the jobs' frames, as counted in the lane's backlog
    started: float  # perf_counter when the batch was formed (its measured time runs from here)
    start_host_ms: float  # host time from forming the batch to its render being enqueued
    handle: RenderHandle
    device_done_s: float  # perf_counter estimate of when the device finishes it

    def device_done(self) -> bool:
        """The device is done with it; also when asking fails (a device error): `result()` then raises it to
        the batch's jobs instead of the lane thread dying on it."""
        try:
            return self.handle.ready()
        except Exception:
            logger.exception("render handle readiness failed")
            return True


@dataclass
class RenderLaneStats:
    jobs_done: int = 0
    batches: int = 0
    frames_rendered: int = 0
    largest_batch_frames: int = 0
    busy_s: float = 0.0
    queue_depth_max: int = 0
    batches_cut_by_deadline: int = 0  # batches that stopped growing because a larger one would be late
    first_frames_jumped: int = 0  # first-frames jobs taken ahead of queued jobs with earlier deadlines
    first_frames_displaced: int = 0  # jobs put back for the next batch to make room for first frames
    frames_skipped_late: int = 0  # requests not rendered: the batch would have finished after their tick
    # Where render batches spend their time (sums): batched feature preparation, the jobs' own pulls, the
    # render.
    prepare_s: float = 0.0
    pulls_s: float = 0.0
    render_s: float = 0.0


class RenderLane:
    def __init__(
        self,
        render: RenderFn,
        *,
        start_render: StartRenderFn | None = None,
        max_batch_frames: int = 32,
        name: str = "render-lane",
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        cost_model: BatchCostModel | None = None,
        deadline_margin_ms: float = 5.0,
        clock: Clock = monotonic_clock,
        prepare: PrepareFn | None = None,
        speaking_hold_s: float = 1.0,
    ) -> None:
        """`buckets`: the engine's batch sizes; `clock`: the clock deadlines are on (the session clocks');
        `prepare`: called with `(source, frames)` of a batch's jobs before their `make_requests` run (the
        engine encodes all their audio features in one call there); `start_render`: the engine's
        `render_async` (the lane then pipelines batches, see "Pipelining"; without it, `render` runs each
        batch to the end); `speaking_hold_s`: how long a session still counts as speaking after its speech
        ended (see `planning_budget_ms`)."""
        self._start_render: StartRenderFn = start_render or (
            lambda requests: RenderedFrames(render(requests))
        )
        self._prepare = prepare
        self.max_batch_frames = max_batch_frames
        self.buckets = tuple(buckets)
        self.cost_model = cost_model or BatchCostModel(self.buckets)
        self._deadline_margin_s = deadline_margin_ms / 1000.0
        self._clock = clock
        self._heap: list[_Job] = []
        self._cond = threading.Condition()
        self._sequence = itertools.count()
        self._closed = False
        self._speaking_hold_s = speaking_hold_s
        # session -> counts as speaking until (inf: speaking now)
        self._speaking_until_s: dict[str, float] = {}
        self._in_flight: _InFlight | None = None  # the started batch not yet collected (lane thread only)
        # smoothed host time from forming a batch to its render's enqueue
        self._start_host_ms: float | None = None
        self._inflight_frames = 0  # frames of the batches started and not yet collected (0: none)
        self._inflight_started_s = 0.0  # on `time.perf_counter`, like the cost model's measurements
        # perf_counter estimate of when the device finishes every batch started (inf: unmeasured)
        self._device_free_s = math.inf
        self._recent_batches: deque[tuple[float, float]] = deque()  # (finished at on `clock`, wall ms)
        self.stats = RenderLaneStats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def clock(self) -> Clock:
        """The clock the lane's deadlines are on: the sessions that submit to it tick on it too."""
        return self._clock

    async def call(self, deadline_s: float, fn: Callable[[], T]) -> T:
        """Run `fn` on the lane thread; returns its result (or raises its exception) on the caller's loop."""
        return await asyncio.wrap_future(self._submit(deadline_s, fn, is_render=False))

    async def render(
        self,
        deadline_s: float,
        make_requests: Callable[[], Sequence[Any]],
        *,
        frames: int = 1,
        source: object | None = None,
        frame_period_s: float | None = None,
        first_frames: bool = False,
        late_grace_s: float = 0.0,
    ) -> list[np.ndarray | None]:
        """Render the requests `make_requests` builds (on the lane thread), batched with other sessions' jobs
        (`submit_render`, awaited)."""
        future = self.submit_render(
            deadline_s,
            make_requests,
            frames=frames,
            source=source,
            frame_period_s=frame_period_s,
            first_frames=first_frames,
            late_grace_s=late_grace_s,
        )
        result: list[np.ndarray | None] = await asyncio.wrap_future(future)
        return result

    def submit_render(
        self,
        deadline_s: float,
        make_requests: Callable[[], Sequence[Any]],
        *,
        frames: int = 1,
        source: object | None = None,
        frame_period_s: float | None = None,
        first_frames: bool = False,
        late_grace_s: float = 0.0,
    ) -> Future[list[np.ndarray | None]]:
        """Queue a render job now (the lane's backlog counts it from here) and return its future.

        `frames`: how many requests it will build (sizes the batch before the features are computed);
        `source`: what `prepare` gets for this job (the session's utterance stream); `frame_period_s`: request
        k is due at `deadline_s + k * frame_period_s`, and one that the batch would finish after comes back
        None (not rendered: see "Overload" above). Without it every request is rendered. `first_frames`: an
        utterance's first frames, planned with the shorter `first_frames_budget_ms` lead: they jump the queue
        (see "First frames" above). `late_grace_s`: a request still counts as in time this long after its due
        time (its session waits that long for it: an utterance's frame 0). Raises RuntimeError when the lane
        is closed."""
        return self._submit(
            deadline_s,
            make_requests,
            is_render=True,
            frames=frames,
            source=source,
            frame_period_s=frame_period_s,
            first_frames=first_frames,
            late_grace_s=late_grace_s,
        )

    def capacity_sessions(self, fps_per_session: float = 25.0, *, max_batch_ms: float = 160.0) -> int | None:
        """Concurrent speaking sessions this lane sustains, from measured batch times (None: not measured
        yet); `max_batch_ms`: the longest batch the sessions' planning budget absorbs
        (`RuntimeConfig.max_batch_ms`)."""
        return self.cost_model.capacity_sessions(
            fps_per_session=fps_per_session, latency_budget_ms=max_batch_ms
        )

    def report(self, *, max_batch_ms: float = 160.0) -> dict[str, Any]:
        """What the lane has done and measured, for `/healthz`: where the GPU's time goes and why frames were
        lost."""
        stats = self.stats
        return {
            "batches": stats.batches,
            "frames_rendered": stats.frames_rendered,
            "frames_skipped_late": stats.frames_skipped_late,
            "largest_batch_frames": stats.largest_batch_frames,
            "batches_cut_by_deadline": stats.batches_cut_by_deadline,
            "busy_s": round(stats.busy_s, 3),
            "stage_s": {
                "prepare": round(stats.prepare_s, 3),
                "pulls": round(stats.pulls_s, 3),
                "render": round(stats.render_s, 3),
            },
            "batch_ms_by_bucket": {
                str(b): round(ms, 2) for b, ms in sorted(self.cost_model.measured().items())
            },
            "speaking_sessions": self.speaking_sessions(),
            "capacity_sessions": self.capacity_sessions(max_batch_ms=max_batch_ms),
        }

    # ---- load and planning budget ---------------------------------------------------------

    def set_speaking(self, session_key: str, speaking: bool) -> None:
        """A session has speech in flight (audio received, frames still to show), or no longer has."""
        with self._cond:
            if speaking:
                self._speaking_until_s[session_key] = math.inf
            elif session_key in self._speaking_until_s:
                self._speaking_until_s[session_key] = self._clock() + self._speaking_hold_s

    def speaking_sessions(self) -> int:
        """Sessions with speech in flight, or whose speech ended less than `speaking_hold_s` ago."""
        now_s = self._clock()
        with self._cond:
            for key in [k for k, until_s in self._speaking_until_s.items() if until_s <= now_s]:
                del self._speaking_until_s[key]
            return len(self._speaking_until_s)

    def steady_batch_ms(
        self,
        sessions: int,
        *,
        frame_period_ms: float = FRAME_PERIOD_MS,
        utilization: float = STEADY_UTILIZATION,
    ) -> float | None:
        """The measured time of the batch the lane settles on with `sessions` speaking (None: nothing
        measured).

        Each speaking session adds a ready frame per period, so while a batch of b frames takes T(b),
        sessions·T(b)/period frames arrive: the lane settles on the smallest bucket b that keeps up with
        `utilization` headroom (sessions·T(b) <= b·period·utilization). The batch of `sessions` frames alone
        would understate it when T > period. When no bucket up to `max_batch_frames` keeps up (overload), the
        largest batch's time.
        """
        largest = bucket_for(self.max_batch_frames, self.buckets)
        fallback: float | None = None
        for bucket in (b for b in self.buckets if b <= largest):
            batch_ms = self.cost_model.estimate_ms(bucket)
            if batch_ms is None:
                return None
            if max(1, sessions) * batch_ms <= bucket * frame_period_ms * utilization:
                return batch_ms
            fallback = batch_ms
        return fallback

    def recent_batch_ms(self, window_s: float = RECENT_BATCHES_WINDOW_S) -> float | None:
        """The mean wall time of the render batches that finished within the last `window_s` (None: none
        did)."""
        since_s = self._clock() - window_s
        with self._cond:
            while self._recent_batches and self._recent_batches[0][0] < since_s:
                self._recent_batches.popleft()
            times_ms = [ms for _, ms in self._recent_batches]
        return sum(times_ms) / len(times_ms) if times_ms else None

    def backlog_ms(self, *, adding_frames: int = 0) -> float:
        """Estimated time until the lane has rendered what it holds now: the rest of the batch in flight plus
        the queued render frames in batches of `max_batch_frames` (0 for what was never measured).
        `adding_frames`: frames about to be submitted, counted as queued."""
        with self._cond:
            queued = sum(job.frames for job in self._heap if job.is_render)
        queued += max(0, adding_frames)
        total_ms = self._inflight_rest_ms()
        full_batches, rest = divmod(queued, self.max_batch_frames)
        if full_batches:
            total_ms += full_batches * (self.cost_model.estimate_ms(self.max_batch_frames) or 0.0)
        if rest:
            total_ms += self.cost_model.estimate_ms(rest) or 0.0
        return total_ms

    def planning_budget_ms(
        self,
        *,
        min_ms: float,
        max_ms: float,
        safety_factor: float = 2.0,
        frame_period_ms: float = FRAME_PERIOD_MS,
        adding_frames: int = 0,
    ) -> float:
        """How far ahead a session should plan a new utterance's first tick: every frame of a
        realtime-streamed utterance then has this long between becoming ready and its tick.

        batch time × `safety_factor` + the current backlog (frame 0 queues behind it), clamped to [`min_ms`,
        `max_ms`]; `min_ms` before anything was measured. The batch time is the larger of the steady batch at
        the current load (`steady_batch_ms`: it sees a burst of new sessions before their frames arrive) and
        the mean of the batches the lane ran in the last seconds (what the load really makes of the batches:
        padding, uneven arrival, feature work). The factor counts the batches a frame may wait through: the
        one in flight when it is submitted, then its own (2; sessions submit each frame's job as soon as it is
        ready, without waiting for their previous job to come back). `adding_frames`: the frames the session
        submits at once (audio that arrived ahead of real time), which join the backlog.
        """
        batch_ms = self._planning_batch_ms(frame_period_ms)
        if batch_ms is None:
            return min_ms
        budget_ms = batch_ms * safety_factor + self.backlog_ms(adding_frames=adding_frames)
        return min(max_ms, max(min_ms, budget_ms))

    def first_frames_budget_ms(
        self,
        *,
        min_ms: float,
        max_ms: float,
        safety_factor: float = 2.0,
        frame_period_ms: float = FRAME_PERIOD_MS,
        adding_frames: int = 1,
        job_frames: int = 4,
        first_due_s: Callable[[float], float] | None = None,
    ) -> float:
        """The shortest lead for `adding_frames` frames submitted now as `first_frames` (frame j due at
        lead + j·period, in jobs of `job_frames`) with which they are rendered by their ticks, with
        `safety_factor` / 2 on each wait (up to two full batches of it) for jitter, and with which no queued
        frame that would be in time without them misses its tick. `first_due_s`: when, on the lane's clock,
        frame 0 is due with a given lead (ms), the session's first tick at least that far away; default
        now + lead.

        The waits are forecast by running the lane's batching rule ahead on its cost model
        (`lane_forecast`), from when the device finishes the batches it has: earliest deadline first, so
        frames due after these do not delay them however long the queue (a burst of utterances that start
        together each wait for the others' first frames, not their whole bursts), while many frames due close
        together make the lane cut its batches to the most urgent deadline, at fewer frames per second.
        Clamped to [`min_ms`, `max_ms`]; `min_ms` before anything was measured."""
        if self.cost_model.estimate_ms(1) is None:
            return min_ms
        adding, job_frames = max(1, adding_frames), max(1, job_frames)
        factor = safety_factor / 2.0
        period_s = frame_period_ms / 1000.0
        now_s = self._clock()
        with self._cond:
            queued = sorted(
                (job.deadline_s, job.sequence, job.frames, job.first_frames)
                for job in self._heap
                if job.is_render
            )
        costs = self._lane_costs()
        start_s = now_s + self._inflight_rest_ms() / 1000.0

        # The jitter allowance grows with the wait up to two full batches' worth (the batch in flight and a
        # frame's own, which the factor was set for), not over every batch of a long queue.
        jitter_cap_s = 2.0 * (self.cost_model.estimate_ms(self.max_batch_frames) or 0.0) / 1000.0

        def in_time(ready_s: float, due_s: float) -> bool:
            wait_s = ready_s - now_s
            return ready_s + (factor - 1.0) * min(wait_s, jitter_cap_s) <= due_s

        def keeps_deadline(ready_s: float, due_s: float) -> bool:
            return ready_s + self._deadline_margin_s <= due_s

        queued_jobs = [ForecastJob(deadline_s, frames, first) for deadline_s, _, frames, first in queued]
        alone_ready_s = forecast_ready_s(queued_jobs, start_s=start_s, costs=costs)
        # The queued jobs these frames must not make late: those in time without them, by their deadlines
        # alone (keeping their sessions' jitter allowance too gave a burst's last utterances all the lead).
        protected = [
            keeps_deadline(ready_s, job.deadline_s)
            for job, ready_s in zip(queued_jobs, alone_ready_s, strict=True)
        ]
        queued_tagged = [(job.deadline_s, 0, index, job) for index, job in enumerate(queued_jobs)]

        lead_ms = max(min_ms, 0.0)
        while lead_ms < max_ms:
            first_at_s = first_due_s(lead_ms) if first_due_s is not None else now_s + lead_ms / 1000.0
            mine = [
                ForecastJob(first_at_s + start * period_s, min(job_frames, adding - start), True)
                for start in range(0, adding, job_frames)
            ]
            # Queued jobs first at equal deadlines (the lane's heap breaks ties by submission order); both
            # lists are in deadline order already.
            mine_tagged = [(job.deadline_s, 1, index, job) for index, job in enumerate(mine)]
            merged = list(heapq.merge(queued_tagged, mine_tagged))
            ready_s = forecast_ready_s([job for *_, job in merged], start_s=start_s, costs=costs)
            if all(
                in_time(ready, job.deadline_s) if is_mine else keeps_deadline(ready, job.deadline_s)
                for (_, is_mine, index, job), ready in zip(merged, ready_s, strict=True)
                if is_mine or protected[index]
            ):
                return lead_ms
            # The next lead that moves frame 0 to a later due time (the next tick, with `first_due_s`).
            lead_ms = max(lead_ms + frame_period_ms / 8.0, (first_at_s - now_s) * 1000.0 + 1.0)
        return max_ms

    def _lane_costs(self) -> LaneCosts:
        """The cost model as the forecast reads it (unmeasured sizes cost nothing: callers check first)."""
        model = self.cost_model
        return LaneCosts.read(
            batch_ms=lambda frames: model.estimate_ms(frames) or 0.0,
            device_ms=lambda frames: model.device_ms(frames) or model.estimate_ms(frames) or 0.0,
            buckets=self.buckets,
            max_batch_frames=self.max_batch_frames,
            deadline_margin_s=self._deadline_margin_s,
            backlog_horizon_batches=BACKLOG_HORIZON_BATCHES,
        )

    def _inflight_rest_ms(self) -> float:
        """Estimated time until the device has finished the batches started and not yet collected (0:
        none): when the lane pipelines, up to two (the one on the device and the next, started just before
        it ends)."""
        with self._cond:
            inflight, started_s, device_free_s = (
                self._inflight_frames,
                self._inflight_started_s,
                self._device_free_s,
            )
        if not inflight:
            return 0.0
        now_s = time.perf_counter()
        by_batch_ms = max(0.0, (self.cost_model.estimate_ms(inflight) or 0.0) - (now_s - started_s) * 1000.0)
        if not math.isfinite(device_free_s):
            return by_batch_ms
        return max(by_batch_ms, (device_free_s - now_s) * 1000.0)

    def _planning_batch_ms(self, frame_period_ms: float) -> float | None:
        """The batch time planning counts with (see `planning_budget_ms`); None before any measurement."""
        batch_ms = self.steady_batch_ms(self.speaking_sessions(), frame_period_ms=frame_period_ms)
        if batch_ms is None:
            return None
        return max(batch_ms, self.recent_batch_ms() or 0.0)

    def _submit(
        self,
        deadline_s: float,
        fn: Callable[[], Any],
        *,
        is_render: bool,
        frames: int = 1,
        source: object | None = None,
        frame_period_s: float | None = None,
        first_frames: bool = False,
        late_grace_s: float = 0.0,
    ) -> Future[Any]:
        future: Future[Any] = Future()
        job = _Job(
            deadline_s,
            next(self._sequence),
            fn,
            future,
            is_render,
            max(1, int(frames)),
            source,
            frame_period_s,
            first_frames,
            max(0.0, late_grace_s),
        )
        with self._cond:
            if self._closed:
                raise RuntimeError("render lane is closed")
            heapq.heappush(self._heap, job)
            self.stats.queue_depth_max = max(self.stats.queue_depth_max, len(self._heap))
            self._cond.notify()
        return future

    def _run(self) -> None:
        while True:
            job, skipped = self._next_job()
            if job is None:  # nothing to start now: collect the batch in flight, or stop
                if self._in_flight is None:
                    return
                self._collect(self._in_flight)
                self._in_flight = None
                continue
            started = time.perf_counter()
            if job.is_render:
                self._run_render_batch(job, skipped)
            else:
                if self._in_flight is not None:
                    self._collect(self._in_flight)
                    self._in_flight = None
                self._run_generic(job)
            self.stats.busy_s += time.perf_counter() - started

    def _next_job(self) -> tuple[_Job | None, list[_Job]]:
        """The next job to start (None: collect the batch in flight, or the lane closed), and the jobs already
        too late for even a one-frame batch, which go along unrendered (see `_entirely_late`)."""
        with self._cond:
            while not self._closed:
                in_flight = self._in_flight
                if in_flight is None:
                    if self._heap:
                        break
                    self._cond.wait()
                    continue
                if self._heap and self._start_next_now(in_flight):
                    break
                if in_flight.device_done():
                    return None, []
                # The device is still on the batch in flight: wait for more frames to join the next batch.
                self._cond.wait(timeout=self._next_start_wait_s(in_flight))
            if self._closed:
                return None, []
            job = heapq.heappop(self._heap)
            skipped: list[_Job] = []
            while job.is_render and self._heap and self._heap[0].is_render and self._entirely_late(job):
                skipped.append(job)
                job = heapq.heappop(self._heap)
            return job, skipped

    def _start_next_now(self, in_flight: _InFlight) -> bool:
        """Start the next batch while `in_flight` is still on the device? Yes once the device is about to
        finish it (within the time starting a batch takes), or for a non-render job (which collects the batch
        first). Earlier would buy nothing: started right away, the few frames that arrived during the last
        start would make a batch of their own (the device's time on a small batch is mostly lost); and even a
        full batch would only queue on the device, its frames none the sooner
        (bench/results/runtime-notes.md)."""
        if not self._heap[0].is_render or in_flight.device_done():
            return True
        return time.perf_counter() >= in_flight.device_done_s - self._start_lead_s()

    def _next_start_wait_s(self, in_flight: _InFlight) -> float:
        until_s = in_flight.device_done_s - self._start_lead_s() - time.perf_counter()
        # Polled at least every IN_FLIGHT_POLL_S: the device may finish before the estimate.
        return min(IN_FLIGHT_POLL_S, max(until_s, 0.0005))

    def _start_lead_s(self) -> float:
        """How long before the device finishes the batch in flight the next one is started: the host time a
        start takes (features, pulls, enqueueing the render), measured, with margin."""
        return (START_LEAD_FACTOR * (self._start_host_ms or 0.0) + START_LEAD_MARGIN_MS) / 1000.0

    def _run_generic(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            result = job.fn()
        except BaseException as exc:
            self.stats.jobs_done += 1
            job.future.set_exception(exc)
        else:
            self.stats.jobs_done += 1
            job.future.set_result(result)

    def _entirely_late(self, job: _Job) -> bool:
        """Every frame of `job` is due before even a one-frame batch started now would finish."""
        if job.frame_period_s is None:
            return False
        alone_ms = self.cost_model.fastest_recent_ms(1)
        if alone_ms is None:
            return False
        last_due_s = job.deadline_s + job.late_grace_s + (job.frames - 1) * job.frame_period_s
        return last_due_s < self._clock() + alone_ms / 1000.0

    def _run_render_batch(self, first: _Job, skipped: list[_Job]) -> None:
        """Start a batch; the one in flight is collected first when the device is done with it, else right
        after this one is enqueued (its frames are then assembled while the device computes this batch)."""
        previous, self._in_flight = self._in_flight, None
        if previous is not None and previous.device_done():
            self._collect(previous)
            previous = None
        started = time.perf_counter()
        jobs = [first, *self._take_batch(first, skipped)]
        frames = sum(job.frames for job in jobs)
        with self._cond:
            self._inflight_frames += frames
            if previous is None:  # else the backlog keeps counting from the batch still on the device
                self._inflight_started_s = started
        try:
            self._in_flight = self._start_jobs(jobs, frames, started, skipped, after=previous)
        finally:
            if self._in_flight is None:
                with self._cond:
                    self._inflight_frames -= frames
            if previous is not None:
                self._collect(previous)

    def _start_jobs(
        self,
        jobs: list[_Job],
        frames: int,
        started: float,
        skipped: Sequence[_Job] = (),
        *,
        after: _InFlight | None = None,
    ) -> _InFlight | None:
        """Features, pulls and the render's start for `jobs` (`frames`: theirs, as the backlog counts them;
        `after`: the batch still on the device before them); None when nothing went to the engine (the jobs'
        futures are then already resolved)."""
        # One entry per source: a session may have several jobs of one utterance stream in a batch.
        merged: dict[int, tuple[object, int]] = {}
        for job in [*skipped, *jobs]:
            if job.source is not None:
                source, source_frames = merged.get(id(job.source), (job.source, 0))
                merged[id(job.source)] = (source, source_frames + job.frames)
        sources = list(merged.values())
        stage_started = time.perf_counter()
        if self._prepare is not None and sources:
            try:
                self._prepare(sources)
            except Exception:  # each job still computes its own features; only the batching is lost
                logger.exception("batched feature preparation failed")
        pulls_started = time.perf_counter()
        self.stats.prepare_s += pulls_started - stage_started
        # Every job takes its frames' features in deadline order, skipped ones too (a stream is pulled in
        # order, and a source's later frames have later deadlines), whatever order the batch was formed in.
        skipped_ids = {id(job) for job in skipped}
        requests_of: dict[int, Sequence[Any]] = {}
        for job in sorted([*skipped, *jobs]):
            taken = self._take_requests(job)
            if taken is None:
                continue
            if id(job) in skipped_ids:
                self.stats.frames_skipped_late += len(taken)
                job.future.set_result([None] * len(taken))
            else:
                requests_of[id(job)] = taken
        self.stats.jobs_done += len(skipped)
        batch = [(job, requests_of[id(job)]) for job in jobs if id(job) in requests_of]
        if not batch:
            return None
        keep = self._frames_in_time(batch)
        all_requests = [
            request
            for (_, requests), kept in zip(batch, keep, strict=True)
            for request, keep_it in zip(requests, kept, strict=True)
            if keep_it
        ]
        render_started = time.perf_counter()
        self.stats.pulls_s += render_started - pulls_started
        try:
            handle = self._start_render(all_requests) if all_requests else RenderedFrames([])
        except BaseException as exc:
            for queued, _ in batch:
                queued.future.set_exception(exc)
            return None
        finally:
            self.stats.render_s += time.perf_counter() - render_started
        now = time.perf_counter()
        start_host_ms = (now - started) * 1000.0
        self._start_host_ms = smoothed(self._start_host_ms, start_host_ms, START_HOST_SMOOTHING)
        # When the device finishes it: after the batch before it, in the measured device time of its bucket.
        # Unmeasured: never by estimate (the next batch then starts once this one is done).
        count = len(all_requests)
        device_ms = self.cost_model.device_ms(count) if count else 0.0
        begins_s = max(now, after.device_done_s) if after is not None else now
        done_s = math.inf if device_ms is None else begins_s + device_ms / 1000.0
        with self._cond:
            self._device_free_s = done_s
        return _InFlight(batch, keep, count, frames, started, start_host_ms, handle, done_s)

    def _collect(self, in_flight: _InFlight) -> None:
        """Wait for a started batch's frames and hand them to its jobs."""
        batch, keep = in_flight.batch, in_flight.keep
        render_started = time.perf_counter()
        try:
            images = in_flight.handle.result()
        except BaseException as exc:
            for queued, _ in batch:
                queued.future.set_exception(exc)
            return
        finally:
            self.stats.render_s += time.perf_counter() - render_started
            with self._cond:
                self._inflight_frames = max(0, self._inflight_frames - in_flight.frames)
        if in_flight.requests:
            elapsed_ms = (time.perf_counter() - in_flight.started) * 1000.0
            device_ms, host_ms = in_flight.handle.device_ms(), in_flight.handle.host_ms()
            if device_ms is not None and host_ms is not None:
                self.cost_model.observe_device(in_flight.requests, device_ms)
                # The batch's own time, without its wait on the device behind the batch before it (a pipelined
                # lane starts batches a little early on purpose): what a batch of this size costs and takes.
                elapsed_ms = in_flight.start_host_ms + device_ms + host_ms
            self.cost_model.observe(in_flight.requests, elapsed_ms)
            with self._cond:
                self._recent_batches.append((self._clock(), elapsed_ms))
            self.stats.batches += 1
        # Counted before the jobs hear back: a caller that has its frames sees them in the stats.
        self.stats.jobs_done += len(batch)
        self.stats.frames_rendered += in_flight.requests
        self.stats.frames_skipped_late += sum(len(kept) - sum(kept) for kept in keep)
        self.stats.largest_batch_frames = max(self.stats.largest_batch_frames, in_flight.requests)
        rendered = iter(images)
        for (queued, _), kept in zip(batch, keep, strict=True):
            queued.future.set_result([next(rendered) if k else None for k in kept])

    @staticmethod
    def _take_requests(job: _Job) -> Sequence[Any] | None:
        """Run a render job's request builder (its features); None when it was cancelled or failed
        (reported)."""
        if not job.future.set_running_or_notify_cancel():
            return None
        try:
            requests: Sequence[Any] = job.fn()
        except BaseException as exc:
            job.future.set_exception(exc)
            return None
        return requests

    def _frames_in_time(self, batch: list[tuple[_Job, Sequence[Any]]]) -> list[list[bool]]:
        """Per job, which requests to render (see the module docstring, "Overload"): the most of them that a
        batch of their own size finishes in time for. With deadlines d1 >= d2 >= ... that is the k latest for
        the largest k with d_k >= now + T(k); the earlier ones would miss their ticks anyway. Requests of jobs
        without a frame period count as always in time."""
        due = [
            (
                math.inf
                if job.frame_period_s is None
                else job.deadline_s + job.late_grace_s + k * job.frame_period_s,
                index,
                k,
            )
            for index, (job, requests) in enumerate(batch)
            for k in range(len(requests))
        ]
        keep = [[True] * len(requests) for _, requests in batch]
        if not due or all(d == math.inf for d, _, _ in due):
            return keep
        now_s = self._clock()
        due.sort(key=lambda item: item[0], reverse=True)
        kept = 0
        for count in range(len(due), 0, -1):
            estimate_ms = self.cost_model.fastest_recent_ms(count)
            if estimate_ms is None:
                return keep  # not measured enough yet: no grounds to drop anything
            if due[count - 1][0] >= now_s + estimate_ms / 1000.0:
                kept = count
                break
        for _, index, k in due[kept:]:
            keep[index][k] = False
        return keep

    def _take_batch(self, first: _Job, skipped: list[_Job]) -> list[_Job]:
        """More queued render jobs to batch with `first` (see the module docstring for the rule); queued jobs
        that are entirely late go to `skipped` instead, without taking room in the batch."""
        taken: list[_Job] = []
        frames = first.frames
        cut_by_deadline = False
        alone_ms = self.cost_model.estimate_ms(frames)
        # When the most urgent job is late even alone, cutting the batch saves nobody: it only lowers
        # throughput and makes every later job late too (a spiral). Then the batch grows to the frame limit.
        head_feasible = alone_ms is None or (
            self._clock() + alone_ms / 1000.0 + self._deadline_margin_s <= first.deadline_s
        )
        horizon_s = self._backlog_horizon_s()
        with self._cond:
            # A full batch or more due within two full batches' time: the lane is behind, and only throughput
            # brings it back (the frames that a big batch makes late are skipped, `_frames_in_time`); cutting
            # would only make the queue longer. Frames due later (audio that arrived ahead: a TTS burst) do
            # not make it behind, nor do first frames (their leads were planned on batches that keep the most
            # urgent deadline: `first_frames_budget_ms`).
            due_soon = sum(
                job.frames
                for job in self._heap
                if job.is_render and not job.first_frames and job.deadline_s <= horizon_s
            )
            backlogged = frames + due_soon >= self.max_batch_frames
            # Except for first frames: their short lead counted on the batch they ride, not on a full one.
            head_feasible = head_feasible and (not backlogged or first.first_frames)
            while self._heap and self._heap[0].is_render:
                candidate = self._heap[0]
                if self._entirely_late(candidate):
                    skipped.append(heapq.heappop(self._heap))
                    continue
                grown = frames + candidate.frames
                if grown > self.max_batch_frames:
                    break
                if head_feasible and bucket_for(grown, self.buckets) > bucket_for(frames, self.buckets):
                    estimate_ms = self.cost_model.estimate_ms(grown)
                    if estimate_ms is not None:
                        finish_s = self._clock() + estimate_ms / 1000.0 + self._deadline_margin_s
                        if finish_s > first.deadline_s:
                            cut_by_deadline = True
                            break  # the larger bucket would make the most urgent frame late
                taken.append(heapq.heappop(self._heap))
                frames = grown
            if any(job.is_render and job.first_frames for job in self._heap):
                self._admit_first_frames(first, taken, frames, head_feasible)
        if cut_by_deadline:
            self.stats.batches_cut_by_deadline += 1
        return taken

    def _admit_first_frames(self, first: _Job, taken: list[_Job], frames: int, head_feasible: bool) -> None:
        """Queued `first_frames` jobs that the deadline-ordered batch left out join it (see "First frames" in
        the module docstring); called with the queue's lock held, after `_take_batch` grew the batch."""
        waiting = sorted(job for job in self._heap if job.is_render and job.first_frames)
        if not waiting:
            return
        now_s = self._clock()
        # A job put back must still make its deadline in the next batch: after this batch and a full one.
        full_ms = self.cost_model.estimate_ms(self.max_batch_frames)
        admitted: list[_Job] = []
        displaced: list[_Job] = []
        # A stream's frames are pulled in order: once one of a source's jobs stays queued, its later jobs stay
        # too (admitted alone, a later job would take its features before the earlier job's).
        held_sources: set[int] = set()
        for job in waiting:
            source_key = id(job.source) if job.source is not None else id(job)
            if source_key in held_sources:
                continue
            if self._entirely_late(job):
                held_sources.add(source_key)
                continue  # `_take_batch`/`_next_job` hand it out unrendered in its turn
            grown = frames + job.frames
            if grown <= self.max_batch_frames and self._bucket_growth_keeps_head(
                first, frames, grown, head_feasible
            ):
                admitted.append(job)
                frames = grown
                continue
            # The batch is full (or a larger bucket would miss the head's deadline): take the place of jobs
            # that can wait one more batch, latest deadlines first, never the most urgent job itself.
            this_ms = self.cost_model.estimate_ms(frames)
            if this_ms is None or full_ms is None:
                held_sources.add(source_key)
                continue  # unmeasured: no grounds to move anyone's frames later
            holds_until_s = now_s + (this_ms + full_ms) / 1000.0 + self._deadline_margin_s
            movable = sorted(
                (j for j in taken if not j.first_frames and j.deadline_s >= holds_until_s),
                key=lambda j: j.deadline_s,
                reverse=True,
            )
            freed, chosen = 0, []
            for candidate in movable:
                if frames - freed + job.frames <= self.max_batch_frames and self._bucket_growth_keeps_head(
                    first, frames, frames - freed + job.frames, head_feasible
                ):
                    break
                chosen.append(candidate)
                freed += candidate.frames
            new_frames = frames - freed + job.frames
            if new_frames > self.max_batch_frames or not self._bucket_growth_keeps_head(
                first, frames, new_frames, head_feasible
            ):
                held_sources.add(source_key)
                continue
            for candidate in chosen:
                taken.remove(candidate)
                displaced.append(candidate)
            admitted.append(job)
            frames = new_frames
        if not admitted:
            return
        admitted_ids = {id(job) for job in admitted}
        self._heap = [job for job in self._heap if id(job) not in admitted_ids]
        for job in displaced:
            self._heap.append(job)
        heapq.heapify(self._heap)
        earliest_left_s = min((j.deadline_s for j in self._heap if j.is_render), default=math.inf)
        self.stats.first_frames_jumped += sum(1 for job in admitted if job.deadline_s > earliest_left_s)
        self.stats.first_frames_displaced += len(displaced)
        taken.extend(admitted)
        taken.sort()  # deadline order, as `_frames_in_time` and the stream pulls expect

    def _backlog_horizon_s(self) -> float:
        """Frames due before this (the lane's clock) count toward a backlog: two full batches from now (the
        batch being formed and the next); every queued frame while a full batch was never measured."""
        full_ms = self.cost_model.estimate_ms(self.max_batch_frames)
        return math.inf if full_ms is None else self._clock() + BACKLOG_HORIZON_BATCHES * full_ms / 1000.0

    def _bucket_growth_keeps_head(self, first: _Job, frames: int, grown: int, head_feasible: bool) -> bool:
        """Growing the batch from `frames` to `grown` keeps the most urgent job's deadline (same rule as
        `_take_batch`: free within the bucket paid for; beyond it only when the larger bucket's measured time
        still finishes in time, or when the head is late anyway)."""
        if not head_feasible or bucket_for(grown, self.buckets) <= bucket_for(frames, self.buckets):
            return True
        estimate_ms = self.cost_model.estimate_ms(grown)
        if estimate_ms is None:
            return True
        return self._clock() + estimate_ms / 1000.0 + self._deadline_margin_s <= first.deadline_s

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for job in self._heap:
                with contextlib.suppress(Exception):
                    job.future.cancel()
            self._heap.clear()
            self._cond.notify_all()
        self._thread.join(timeout=10.0)
