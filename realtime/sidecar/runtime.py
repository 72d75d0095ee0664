"""A session's runtime: the 25-fps clock, idle cycle, speech frames, crossfades, interrupts, stats.

The clock is the audio's. Tick n is due at t0 + n·40 ms and carries 40 ms of audio: the
next 1920 playout samples of the playing utterance, or silence. Its frame is the speech
frame rendered for exactly those samples (same index space, see `timeline`), or the idle
cycle's frame n. The clock never waits for the engine: a speech frame that is not rendered
by its tick is a dropped frame (the previous frame is held) while its audio still plays.

Utterances are planned before they play: once frame 0 of the next utterance is ready
(80 ms of lookahead audio exist, or the utterance ended), it gets a start tick — the
first tick at least the planning budget away — and the render task renders its frames
ahead of the clock (at most `render_ahead_frames`), through the process's render lane.
Audio streams in real time, so every frame of the utterance is ready only about that budget
before its tick: it is `render_budget_ms` on an idle lane and grows with the lane's measured
batch time at the current load, up to `max_render_budget_ms` (`RenderLane.planning_budget_ms`),
so many sessions hold without dropped frames at the price of a later first frame. Each ready
frame goes to the lane as soon as it is ready, while the session's earlier jobs are still there:
a frame then waits for at most the batch in flight and its own. Audio that arrived ahead of real
time (a TTS burst) makes frames ready before their share of that budget: those are submitted as
first frames, which jump the lane's queue, and the utterance starts with only the lead they need
(`_first_tick_lead`; `RuntimeConfig.first_frame_priority`). An utterance whose audio came while the one
before it still plays starts right after it, unless that is sooner than its first frames can be
rendered: then after a pause of a few ticks (`utterance_start_deferred_ticks`), audio and frames together.
A frame 0 that its batch delivers late (a batch ran longer than measured) holds the utterance's start for
up to `first_frame_wait_ticks` ticks, audio and frames together, rather than playing over a held frame.
If the client's audio runs dry mid-utterance (it streams slower than real time), the
utterance pauses: idle frames with silence, and it resumes one tick later.

`interrupt` flushes every stage at once: queued audio (timeline), feature streams, frames
rendered ahead, work in flight (its result is discarded by generation), and the
publishers' queues. The next tick is idle (a hard cut, no crossfade), so a subscriber
sees idle frames within two frames of the interrupt.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from realtime.clock import Clock
from realtime.host import SessionStats
from realtime.ingest.formats import FRAME_RATE_FPS, PLAYOUT_SAMPLES_PER_FRAME, TIMELINE_SAMPLE_RATE_HZ
from realtime.ingest.resample import ConvertedAudio
from realtime.outputs.base import FrameKind, Publisher, PublishTick
from realtime.sidecar.config import RuntimeConfig
from realtime.sidecar.engine_port import FramesOutOfOrder, SessionEngine, UtteranceClosed, UtteranceStream
from realtime.sidecar.render_lane import RenderLane
from realtime.sidecar.timeline import SessionTimeline, Utterance

logger = logging.getLogger(__name__)

_SILENCE = np.zeros(PLAYOUT_SAMPLES_PER_FRAME, dtype=np.float32)


class PlaybackListener(Protocol):
    """Told when an utterance starts and stops playing (WS connections, the agents bridge)."""

    def on_playback_started(self, utterance_id: int, source: str, frame_id: int) -> None: ...

    def on_playback_finished(
        self, utterance_id: int, source: str, position_s: float, interrupted: bool
    ) -> None: ...


@dataclass(frozen=True)
class FinishedPlayback:
    utterance_id: int
    source: str
    position_s: float
    interrupted: bool


@dataclass
class RuntimeCounters:
    """What a session's clock and render task counted since it started; `SessionRuntime.stats` reports
    them."""

    frames_published: int = 0
    speech_frames: int = 0
    idle_frames: int = 0
    render_misses: int = 0  # speech ticks whose frame was not rendered in time (the held frame was shown)
    underrun_ticks: int = 0  # ticks an utterance paused because its audio had not arrived
    clock_resyncs: int = 0  # stalls of the event loop long enough that the clock restarted from now
    interrupts: int = 0
    render_errors: int = 0
    # ticks of pause put between an utterance and the one before it, so its first frames could be rendered
    utterance_start_deferred_ticks: int = 0
    # ticks an utterance's start waited, audio and frames together, for a frame 0 still in the render lane
    first_frame_wait_ticks: int = 0


@dataclass
class RuntimeSamples:
    """A session's timing samples: one per utterance (TTFF, planned lead) or per tick/batch, the latter in a
    bounded window (`RuntimeConfig.lateness_window_ticks`) so a long session's memory stays flat."""

    window: int
    ttff_ms: list[float] = field(default_factory=list)
    # the TTFF of each utterance that started a turn: nothing of this session played or was planned when it
    # was planned. The others followed one still playing, which holds their start until it ends: their TTFF
    # is that wait, not a delay anyone hears (the speech goes on).
    turn_ttff_ms: list[float] = field(default_factory=list)
    lateness_ms: deque[float] = field(init=False)  # how late each tick went out
    # how long before its tick a batch's first frame was ready
    render_slack_ms: deque[float] = field(init=False)
    # the lead each utterance's first tick was planned with
    planned_budget_ms: deque[float] = field(init=False)
    # per utterance played out: playback_finished's send time minus when the output says its last speech
    # sample is heard (+ = the event came late)
    finished_error_ms: deque[float] = field(init=False)

    def __post_init__(self) -> None:
        self.lateness_ms = deque(maxlen=self.window)
        self.render_slack_ms = deque(maxlen=self.window)
        self.planned_budget_ms = deque(maxlen=self.window)
        self.finished_error_ms = deque(maxlen=self.window)


@dataclass
class _Plan:
    """An utterance with a start tick: its frames are rendered ahead and shown from that tick on."""

    utterance: Utterance
    stream: UtteranceStream
    start_tick: int
    next_frame: int = 0  # next frame to show
    next_to_render: int = 0
    # frames [0, first_frames) were planned with less lead than the load's budget: they jump
    first_frames: int = 0
    rendered: dict[int, np.ndarray] = field(default_factory=dict)
    frame0_in_lane: bool = False  # the job with frame 0 was submitted and has not come back yet
    start_waits: int = 0  # ticks this utterance's start waited for its frame 0
    # planned while nothing of this session played or was planned (see `RuntimeSamples.turn_ttff_ms`)
    starts_turn: bool = False


class SessionRuntime:
    def __init__(
        self,
        session_id: str,
        engine: SessionEngine,
        publishers: list[Publisher],
        lane: RenderLane,
        config: RuntimeConfig | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        """`clock`: the clock ticks and deadlines are on; the lane's by default, since the lane orders this
        session's render jobs by those deadlines."""
        self.session_id = session_id
        self.engine = engine
        self.publishers = publishers
        self.lane = lane
        self.config = config or RuntimeConfig()
        self._clock: Clock = clock or lane.clock
        self.timeline = SessionTimeline(self.config.buffer_limit_samples)
        self._period_s = 1.0 / FRAME_RATE_FPS
        self._streams: dict[int, UtteranceStream] = {}
        self._plans: deque[_Plan] = deque()
        self._listeners: list[PlaybackListener] = []
        # Playback events wait until the audio is heard (see `_playout_delay_s`): utterance id -> pending
        # event.
        self._pending_started: dict[int, tuple[asyncio.TimerHandle, Utterance, int]] = {}
        self._pending_finished: dict[int, tuple[asyncio.TimerHandle, FinishedPlayback, float]] = {}
        self._generation = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # render jobs in the lane (several per session at once)
        self._render_jobs: set[asyncio.Task[None]] = set()
        self._t0_s = 0.0
        self._tick = 0
        self._started_at_s: float | None = None
        # int16 delta of the last speech frame over its idle frame
        self._crossfade_from: np.ndarray | None = None
        self._crossfade_left = 0
        self._last_frame: np.ndarray | None = None
        self.counters = RuntimeCounters()
        self.samples = RuntimeSamples(self.config.lateness_window_ticks)
        self.last_audio_at_s: float | None = None  # on `clock`: the idle timeout counts from it
        self.last_error = ""
        self.task_failure: str | None = None  # set when the clock or render task died: the session is dead
        self.stopped = False  # set by `stop`: audio that arrives later is rejected (nothing would play it)
        self.ingest_warnings: dict[str, float] = {}  # set by the audio inputs (e.g. ws_suspect_sample_rate)

    # ---- lifecycle ------------------------------------------------------------------------

    @property
    def lookahead_ms(self) -> int:
        """Audio a speech frame needs beyond its own before it renders (the engine's), told to audio
        clients."""
        return self.engine.lookahead_ms

    @property
    def running(self) -> bool:
        """The clock and the render task are both alive (either one alone publishes nothing useful)."""
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    async def start(self) -> None:
        if self._tasks:
            return
        self._t0_s = self._clock()
        self._started_at_s = self._t0_s
        self._tasks = [
            asyncio.create_task(self._clock_loop(), name=f"clock-{self.session_id}"),
            asyncio.create_task(self._render_loop(), name=f"render-{self.session_id}"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._on_task_done)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        """A clock or render task that dies stops the session's frames: say so now, not only at `stop`."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        self.last_error = f"{task.get_name()} failed: {exc!r}"
        self.task_failure = self.task_failure or self.last_error  # the first one: run_session ends on it
        logger.error("session task failed", exc_info=exc, extra={"session_id": self.session_id})

    async def stop(self) -> None:
        """Stop the clock and the render task; unplayed audio is accounted as flushed.

        A task that already died is not re-raised here (it was logged when it died): the caller's teardown
        must go on to close the publishers and account for the audio."""
        self.stopped = True
        tasks = [*self._tasks, *self._render_jobs]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await task
                except Exception:
                    logger.debug("stopped a failed session task", extra={"session_id": self.session_id})
        self._tasks = []
        self._render_jobs.clear()
        self._discard_all(interrupted=True, notify=True)

    def add_listener(self, listener: PlaybackListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    # ---- ingest side (called by audio inputs on the event loop) ----------------------------

    def ingest(self, audio: ConvertedAudio, source: str, first_byte_at_s: float) -> None:
        """Append accepted audio (capacity was checked by the caller)."""
        self.last_audio_at_s = self._clock()
        if audio.timeline.size == 0 and audio.playout.size == 0:
            return
        utterance = self.timeline.append(audio, source)
        if utterance.first_audio_at_s is None:
            utterance.first_audio_at_s = first_byte_at_s
        stream = self._streams.get(utterance.utterance_id)
        if stream is None:
            stream = self.engine.open_utterance()
            self._streams[utterance.utterance_id] = stream
        stream.push_audio(audio.timeline)
        self._update_speaking()
        self._wake.set()

    def end_utterance(self) -> int | None:
        """Close the open utterance; returns its id (None when no audio was open)."""
        utterance = self.timeline.end_utterance()
        if utterance is None:
            return None
        stream = self._streams.get(utterance.utterance_id)
        if stream is not None:
            stream.end()
        self._wake.set()
        return utterance.utterance_id

    def interrupt(self) -> list[FinishedPlayback]:
        """Flush everything queued; returns the utterances it cut (each is also told to listeners)."""
        self.counters.interrupts += 1
        finished = self._discard_all(interrupted=True, notify=True)
        # A hard cut: the next tick is the idle frame, with nothing blended in.
        self._crossfade_from = None
        self._crossfade_left = 0
        for publisher in self.publishers:
            try:
                publisher.interrupt(self.engine.avatar.idle_frame)
            except Exception as exc:
                # One output failing to cut must not leave the others playing the flushed speech.
                self.last_error = f"{publisher.name}: interrupt failed: {exc}"
                logger.exception("publisher interrupt failed", extra={"session_id": self.session_id})
        self._wake.set()
        return finished

    def _discard_all(self, *, interrupted: bool, notify: bool) -> list[FinishedPlayback]:
        self._generation += 1
        now_s = self._clock()
        # Events still waiting for their audio to be heard go out now; a started one first (its audio began).
        for utterance_id, (handle, utterance, frame_id) in list(self._pending_started.items()):
            handle.cancel()
            del self._pending_started[utterance_id]
            if notify:
                self._notify_started_now(utterance, frame_id)
        # Utterances whose audio was all handed to the outputs but not all heard: the rest went with their
        # queues.
        finished: list[FinishedPlayback] = []
        for handle, item, audio_end_s in self._pending_finished.values():
            handle.cancel()
            unheard_s = max(0.0, audio_end_s + self._playout_delay_s() - now_s)
            heard_s = max(0.0, item.position_s - unheard_s)
            finished.append(dataclasses.replace(item, position_s=heard_s, interrupted=True))
        self._pending_finished.clear()
        planned = {plan.utterance.utterance_id for plan in self._plans}
        # The one playing: what was handed to the outputs less what they had not played yet (their queues
        # cleared).
        delay_s = self._playout_delay_s()
        unheard_s = max(0.0, self._tick_deadline(self._tick) + delay_s - now_s) if delay_s else 0.0
        finished += [
            FinishedPlayback(
                p.utterance.utterance_id,
                p.utterance.source,
                max(
                    0.0, p.utterance.duration_played_s - (unheard_s if p.utterance.duration_played_s else 0.0)
                ),
                interrupted,
            )
            for p in self._plans
        ]
        dropped = self.timeline.flush()
        finished += [
            FinishedPlayback(u.utterance_id, u.source, u.duration_played_s, interrupted)
            for u in dropped
            if u.utterance_id not in planned
        ]
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()
        self._plans.clear()
        self._update_speaking()
        if notify:
            for item in finished:
                self._notify_finished(item)
        return finished

    # ---- render task ----------------------------------------------------------------------

    def _tick_deadline(self, tick: int) -> float:
        return self._t0_s + tick * self._period_s

    def _update_speaking(self) -> None:
        """Tell the lane whether this session has speech in flight (its load estimate counts such
        sessions)."""
        self.lane.set_speaking(self.session_id, bool(self._streams))

    def _planning_budget_ms(self, adding_frames: int = 0) -> float:
        """How far ahead a new utterance's first tick is planned (see the module docstring); `adding_frames`:
        the frames this session is about to submit at once beyond its one per period (audio that arrived
        ahead)."""
        return self.lane.planning_budget_ms(
            min_ms=self.config.render_budget_ms,
            max_ms=self._max_lead_ms(),
            safety_factor=self.config.render_budget_safety,
            frame_period_ms=self._period_s * 1000.0,
            adding_frames=adding_frames,
        )

    def _max_lead_ms(self) -> float:
        config = self.config
        # Frames more than `render_ahead_frames` ahead are not rendered yet: a longer lead would only wait.
        return max(
            config.render_budget_ms,
            min(config.max_render_budget_ms, (config.render_ahead_frames - 1) * self._period_s * 1000.0),
        )

    def _plan_next(self) -> None:
        """Give the next queued utterance a start tick once its frame 0 can be rendered."""
        planned = {plan.utterance.utterance_id for plan in self._plans}
        candidates = [u for u in self.timeline.utterances if u.utterance_id not in planned]
        if not candidates:
            return
        utterance = candidates[0]
        stream = self._streams.get(utterance.utterance_id)
        if stream is None or stream.ready_frame_count() < 1:
            return
        ready = stream.ready_frame_count()
        budget_ms: float | None = None
        if self._plans:
            last = self._plans[-1]
            count = last.utterance.frame_count
            if count is None:
                return  # the previous utterance is still open: its length (and so this start) is unknown
            start_tick = last.start_tick + count
            if self.config.first_frame_priority:
                # Right after the one that plays, unless that is sooner than its first frames can be rendered
                # (the lead was the previous utterance's, planned at another load): then a short pause at the
                # boundary, with the audio, rather than frames missed after it.
                budget_ms, lead_ms = self._first_tick_lead(ready)
                earliest_tick = self._first_tick_after(lead_ms)
                if earliest_tick > start_tick:
                    self.counters.utterance_start_deferred_ticks += earliest_tick - start_tick
                    start_tick = earliest_tick
        else:
            budget_ms, lead_ms = self._first_tick_lead(ready)
            self.samples.planned_budget_ms.append(lead_ms)
            start_tick = self._first_tick_after(lead_ms)
        first_frames = self._first_frames(start_tick, ready, budget_ms)
        starts_turn = not self._plans
        self._plans.append(
            _Plan(utterance, stream, start_tick, first_frames=first_frames, starts_turn=starts_turn)
        )

    def _first_tick_lead(self, ready_frames: int) -> tuple[float, float]:
        """The load's planning budget B, and the lead of a new utterance's first tick.

        Frame k that becomes ready later, in real time, has the lead + k·period minus the k·period its audio
        takes to arrive: the lead itself, which must be B. But frames that are ready already (audio that
        arrived ahead of real time: a TTS burst) need only be rendered by their ticks: with the first-frame
        priority they wait for the batch in flight and their own, not the backlog
        (`RenderLane.first_frames_budget_ms`). So the lead is the larger of that and B − (ready − 1)·period,
        which the first audio still to arrive needs.
        """
        adding = self._frames_submitted_at_once(ready_frames)
        budget_ms = self._planning_budget_ms(adding - 1)  # the budget counts one frame per session already
        if not self.config.first_frame_priority:
            return budget_ms, budget_ms
        period_ms = self._period_s * 1000.0
        first_ms = self.lane.first_frames_budget_ms(
            min_ms=self.config.render_budget_ms,
            max_ms=budget_ms,
            safety_factor=self.config.render_budget_safety,
            frame_period_ms=period_ms,
            adding_frames=adding,
            job_frames=self._first_frames_job_frames(),
            first_due_s=self._first_tick_due_s,
        )
        return budget_ms, max(first_ms, budget_ms - max(0, ready_frames - 1) * period_ms)

    def _first_tick_after(self, lead_ms: float) -> int:
        """The first tick at least `lead_ms` from now (how a lead becomes an utterance's start tick)."""
        due_s = self._clock() + lead_ms / 1000.0
        return max(self._tick, math.ceil((due_s - self._t0_s) / self._period_s))

    def _first_tick_due_s(self, lead_ms: float) -> float:
        """When that tick is due: what the lane's lead search places frame 0 at."""
        return self._tick_deadline(self._first_tick_after(lead_ms))

    def _first_frames_job_frames(self) -> int:
        """Frames per job among an utterance's first frames (`RuntimeConfig.first_frames_job_frames`)."""
        return max(1, min(self.config.render_batch_frames, self.config.first_frames_job_frames))

    def _frames_submitted_at_once(self, ready_frames: int) -> int:
        """Frames ready now go to the lane at once (in jobs of `render_batch_frames`), up to
        `render_ahead_frames`."""
        return min(max(1, ready_frames), self.config.render_ahead_frames)

    def _first_frames(self, start_tick: int, ready_frames: int, budget_ms: float | None) -> int:
        """How many of an utterance's first frames jump the lane's queue: those ready now whose ticks are
        closer than the load's planning budget (a short lead, or an utterance queued behind one that plays:
        its audio arrived ahead of real time). Frames that become ready later in real time get the budget's
        slack."""
        if not self.config.first_frame_priority:
            return 0
        if budget_ms is None:
            budget_ms = self._planning_budget_ms(self._frames_submitted_at_once(ready_frames) - 1)
        closer_than_s = self._clock() + budget_ms / 1000.0
        count = 0
        while count < self._frames_submitted_at_once(ready_frames) and count < ready_frames:
            if self._tick_deadline(start_tick + count) >= closer_than_s:
                break
            count += 1
        return count

    def _next_render_job(self) -> tuple[_Plan, list[int]] | None:
        for plan in self._plans:
            ready = plan.stream.ready_frame_count()
            limit = min(ready, plan.next_frame + self.config.render_ahead_frames)
            if plan.next_to_render < limit:
                stop = min(limit, plan.next_to_render + self.config.render_batch_frames)
                if plan.next_to_render < plan.first_frames:  # a job is all first frames or none
                    stop = min(stop, plan.first_frames, plan.next_to_render + self._first_frames_job_frames())
                return plan, list(range(plan.next_to_render, stop))
            if plan.next_to_render < ready:
                return None  # this utterance is far enough ahead; later ones wait their turn
        return None

    async def _render_loop(self) -> None:
        while True:
            self._plan_next()
            job = self._next_render_job()
            if job is None:
                await self._wake.wait()
                self._wake.clear()
                continue
            plan, frames = job
            # Frames count as taken once their job is submitted, so the session's next ready frame gets its
            # own job at once: waiting for this job to come back first would add up to two of the lane's
            # batches to that frame's latency under load. Jobs of one stream still run in order (later ticks,
            # later deadline).
            plan.next_to_render = frames[-1] + 1
            if frames[0] == 0:
                plan.frame0_in_lane = True
            # Queued before this loop yields: the next session planning in this same loop turn (a burst of
            # sessions whose audio arrived together) sees these frames in the lane's backlog.
            pending = self._submit_render(plan, frames)
            task = asyncio.create_task(self._render_job(plan, frames, self._generation, pending))
            self._render_jobs.add(task)
            task.add_done_callback(self._render_jobs.discard)

    def _submit_render(self, plan: _Plan, frames: list[int]) -> Future[list[np.ndarray | None]]:
        ticks = [plan.start_tick + k for k in frames]
        stream = plan.stream

        def make_requests() -> Sequence[Any]:
            return stream.render_requests(frames, ticks)

        try:
            return self.lane.submit_render(
                self._tick_deadline(ticks[0]),
                make_requests,
                frames=len(frames),
                source=stream,
                # frames that would be late are skipped, not rendered (overload)
                frame_period_s=self._period_s,
                first_frames=frames[0] < plan.first_frames,
                # its utterance waits for frame 0 (`_waits_for_frame0`): render it late rather than skip it
                late_grace_s=self.config.first_frame_wait_ticks * self._period_s if frames[0] == 0 else 0.0,
            )
        except Exception as exc:  # a closed lane: the job fails like a failed render (counted, logged)
            failed: Future[list[np.ndarray | None]] = Future()
            failed.set_exception(exc)
            return failed

    async def _render_job(
        self, plan: _Plan, frames: list[int], generation: int, pending: Future[list[np.ndarray | None]]
    ) -> None:
        try:
            images: list[np.ndarray | None] = await asyncio.wrap_future(pending)
        except UtteranceClosed:
            # Its utterance finished playing (or was flushed) while the job waited in the lane: nothing to
            # render.
            logger.debug("render job of a closed utterance", extra={"session_id": self.session_id})
            images = []
        except FramesOutOfOrder as exc:
            # Overtaken by a later job of its stream (the lane keeps a stream's jobs in order; this is the
            # backstop): only this job's frames are lost.
            self.counters.render_errors += 1
            self.last_error = f"render failed: {exc}"
            logger.warning("render job overtaken", extra={"session_id": self.session_id, "error": str(exc)})
            images = []
        except Exception as exc:
            # A failed render costs frames (held frames count as dropped), never the session or its audio.
            self.counters.render_errors += 1
            self.last_error = f"render failed: {exc}"
            logger.exception("render failed", extra={"session_id": self.session_id})
            images = []
        if frames[0] == 0:
            plan.frame0_in_lane = False  # rendered, skipped as too late, or failed: nothing more to wait for
        if generation != self._generation or plan not in self._plans:
            return  # interrupted while rendering: the frames belong to flushed audio
        # How long before its tick the batch's first frame became ready (negative: it missed).
        self.samples.render_slack_ms.append(
            (self._tick_deadline(plan.start_tick + frames[0]) - self._clock()) * 1000.0
        )
        for frame_index, image in zip(frames, images, strict=False):
            if image is not None and frame_index >= plan.next_frame:  # None: skipped by the lane, too late
                plan.rendered[frame_index] = image

    # ---- clock ----------------------------------------------------------------------------

    async def _clock_loop(self) -> None:
        while True:
            deadline = self._tick_deadline(self._tick)
            delay = deadline - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            now = self._clock()
            lateness_s = now - deadline
            if lateness_s > self.config.resync_after_ms / 1000.0:
                # The loop was stalled: restart the clock from now rather than bursting frames out.
                self.counters.clock_resyncs += 1
                self._t0_s += lateness_s
                deadline = self._tick_deadline(self._tick)
                for plan in self._plans:
                    plan.start_tick = max(plan.start_tick, self._tick)
            self.samples.lateness_ms.append(max(0.0, (now - deadline) * 1000.0))
            tick = self._compose_tick(self._tick, deadline)
            for publisher in self.publishers:
                try:
                    await publisher.publish(tick)
                except Exception as exc:
                    self.last_error = f"{publisher.name}: {exc}"
                    logger.exception("publisher failed", extra={"session_id": self.session_id})
            self.counters.frames_published += 1
            self._tick += 1
            if tick.utterance_id is not None and tick.utterance_id in self._pending_finished:
                self._rearm_finished(tick.utterance_id)

    def _compose_tick(self, tick: int, deadline: float) -> PublishTick:
        wall_us = int((time.time() + (deadline - self._clock())) * 1_000_000)
        plan = self._plans[0] if self._plans else None
        if plan is not None and plan.start_tick <= tick:
            # Frame k plays once it can be rendered (its 80 ms lookahead exists, or the utterance ended):
            # playing its audio earlier would show a held frame over it.
            if plan.next_frame < plan.stream.ready_frame_count():
                if not self._waits_for_frame0(plan):
                    return self._speech_tick(plan, tick, deadline, wall_us)
                # Its frame 0 is still in the render lane (a batch ran long): start a tick later, audio and
                # frames together, rather than play the first syllable over a held frame.
                plan.start_waits += 1
                self.counters.first_frame_wait_ticks += 1
            else:
                # The client's audio has not caught up with the clock: pause this utterance for a tick.
                self.counters.underrun_ticks += 1
            for later in self._plans:
                later.start_tick += 1
        return self._idle_tick(tick, deadline, wall_us)

    def _waits_for_frame0(self, plan: _Plan) -> bool:
        """Whether the utterance's start waits this tick: its frame 0 is not here but still coming, and it
        has waited fewer than `RuntimeConfig.first_frame_wait_ticks`. Nothing has played yet, so waiting
        costs the utterance one tick of latency where playing would cost a frame of its speech."""
        return (
            plan.next_frame == 0
            and 0 not in plan.rendered
            and plan.frame0_in_lane
            and plan.start_waits < self.config.first_frame_wait_ticks
        )

    def _speech_tick(self, plan: _Plan, tick: int, deadline: float, wall_us: int) -> PublishTick:
        utterance = plan.utterance
        k = plan.next_frame
        audio = utterance.frame_audio(k)
        image = plan.rendered.pop(k, None)
        if image is None:
            self.counters.render_misses += 1
            image = self._last_frame if self._last_frame is not None else self.engine.avatar.idle_frame(tick)
        if k == 0:
            self._schedule_started(utterance, tick, deadline)
            if utterance.first_audio_at_s is not None:
                ttff_ms = (self._clock() - utterance.first_audio_at_s) * 1000.0
                self.samples.ttff_ms.append(ttff_ms)
                if plan.starts_turn:
                    self.samples.turn_ttff_ms.append(ttff_ms)
        self.timeline.mark_played(utterance, audio)
        plan.next_frame = k + 1
        self.counters.speech_frames += 1
        self._last_frame = image
        self._crossfade_from = None
        self._crossfade_left = 0
        if audio.is_last:
            self._plans.popleft()
            stream = self._streams.pop(utterance.utterance_id, None)
            if stream is not None:
                stream.close()
            self._update_speaking()
            # What the engine changed on its own base frame fades out over the next idle frames.
            self._crossfade_from = image.astype(np.int16) - self.engine.avatar.idle_frame(tick).astype(
                np.int16
            )
            self._crossfade_left = self.config.crossfade_frames
            self._schedule_finished(
                FinishedPlayback(
                    utterance.utterance_id, utterance.source, utterance.duration_played_s, False
                ),
                # the padding is not speech
                audio_end_s=deadline + audio.timeline_samples / TIMELINE_SAMPLE_RATE_HZ,
            )
        self._wake.set()  # the render-ahead window moved
        return PublishTick(
            frame_index=tick,
            deadline_s=deadline,
            wall_time_us=wall_us,
            frame_rgb=image,
            audio_playout=audio.playout,
            speech_samples=audio.timeline_samples,
            kind=FrameKind.SPEECH,
            utterance_id=utterance.utterance_id,
        )

    def _idle_tick(self, tick: int, deadline: float, wall_us: int) -> PublishTick:
        image = self.engine.avatar.idle_frame(tick)
        kind = FrameKind.IDLE
        if self._crossfade_from is not None and self._crossfade_left > 0:
            weight = self._crossfade_left / (self.config.crossfade_frames + 1)
            image = _fade_in_delta(image, self._crossfade_from, weight)
            self._crossfade_left -= 1
            kind = FrameKind.CROSSFADE
        else:
            self._crossfade_from = None
        self.counters.idle_frames += 1
        self._last_frame = image
        return PublishTick(
            frame_index=tick,
            deadline_s=deadline,
            wall_time_us=wall_us,
            frame_rgb=image,
            audio_playout=_SILENCE,
            speech_samples=0,
            kind=kind,
        )

    # ---- notifications --------------------------------------------------------------------

    def _playout_delay_s(self) -> float:
        """How long after its tick's deadline a tick's audio is heard, on the slowest output that reports it
        (LiveKit: its audio headroom + the receivers' audio path). Playback events wait that long, so that
        `playback_finished` means the audio has played out, not that its last frame was handed over."""
        delays = [0.0]
        for publisher in self.publishers:
            delay = getattr(publisher, "playout_delay_s", None)
            if callable(delay):
                delays.append(float(delay()))
        return max(delays)

    def _schedule_started(self, utterance: Utterance, frame_id: int, deadline_s: float) -> None:
        delay_s = self._playout_delay_s()
        if not delay_s:  # no output reports a delay: handed over is played
            self._notify_started_now(utterance, frame_id)
            return
        loop = asyncio.get_running_loop()
        uid = utterance.utterance_id

        def fire() -> None:
            if self._pending_started.pop(uid, None) is not None:
                self._notify_started_now(utterance, frame_id)

        self._pending_started[uid] = (
            loop.call_later(deadline_s + delay_s - self._clock(), fire),
            utterance,
            frame_id,
        )

    def _schedule_finished(self, item: FinishedPlayback, *, audio_end_s: float) -> None:
        """`item` once the utterance's last sample (handed over at `audio_end_s`) has been heard."""
        delay_s = self._playout_delay_s()
        if not delay_s:
            self._notify_finished(item)
            return
        self._arm_finished(item, audio_end_s, audio_end_s + delay_s)

    def _arm_finished(self, item: FinishedPlayback, audio_end_s: float, at_s: float) -> None:
        handle = asyncio.get_running_loop().call_later(
            max(0.0, at_s - self._clock()), self._fire_finished, item.utterance_id
        )
        self._pending_finished[item.utterance_id] = (handle, item, audio_end_s)

    def _rearm_finished(self, utterance_id: int) -> None:
        """The utterance's last tick has been published: its event goes when the output says its last speech
        sample is heard (the estimate it was scheduled with took the audio delay of an earlier tick, which a
        stall or the re-anchoring may have changed since)."""
        heard_at_s = self._speech_heard_at_s(utterance_id)
        if heard_at_s is None:
            return
        handle, item, audio_end_s = self._pending_finished[utterance_id]
        handle.cancel()
        self._arm_finished(item, audio_end_s, heard_at_s)

    def _fire_finished(self, utterance_id: int) -> None:
        pending = self._pending_finished.pop(utterance_id, None)
        if pending is not None:
            self._record_finished_error(utterance_id)
            self._notify_finished(pending[1])

    def _speech_heard_at_s(self, utterance_id: int) -> float | None:
        """When the first output that says so hears the utterance's last speech sample, on this clock."""
        for publisher in self.publishers:
            heard_at = getattr(publisher, "speech_heard_at_s", None)
            heard_at_s = heard_at(utterance_id) if callable(heard_at) else None
            if heard_at_s is not None:
                return float(heard_at_s)
        return None

    def _record_finished_error(self, utterance_id: int) -> None:
        """How far from the moment the outputs say the utterance's last speech sample is heard its
        playback_finished goes out, on this clock (+ = late: the event loop was busy)."""
        heard_at_s = self._speech_heard_at_s(utterance_id)
        if heard_at_s is not None:
            self.samples.finished_error_ms.append((self._clock() - heard_at_s) * 1000.0)

    def _notify_started_now(self, utterance: Utterance, frame_id: int) -> None:
        for listener in list(self._listeners):
            try:
                listener.on_playback_started(utterance.utterance_id, utterance.source, frame_id)
            except Exception:
                logger.exception("playback listener failed")

    def _notify_finished(self, item: FinishedPlayback) -> None:
        for listener in list(self._listeners):
            try:
                listener.on_playback_finished(
                    item.utterance_id, item.source, item.position_s, item.interrupted
                )
            except Exception:
                logger.exception("playback listener failed")

    # ---- stats ----------------------------------------------------------------------------

    @property
    def tick(self) -> int:
        return self._tick

    @property
    def playing(self) -> bool:
        return bool(self._plans) and self._plans[0].start_tick <= self._tick

    def stats(self) -> SessionStats:
        accounting = self.timeline.accounting
        publisher_stats = [p.stats() for p in self.publishers]
        counters, samples = self.counters, self.samples
        lateness = np.asarray(samples.lateness_ms, dtype=np.float64)
        extra: dict[str, float] = {
            "audio_samples_flushed": float(accounting.flushed),
            "audio_samples_clipped": float(accounting.clipped),
            "render_misses": float(counters.render_misses),
            "underrun_ticks": float(counters.underrun_ticks),
            "clock_resyncs": float(counters.clock_resyncs),
            "interrupts": float(counters.interrupts),
            "render_errors": float(counters.render_errors),
            "utterance_start_deferred_ticks": float(counters.utterance_start_deferred_ticks),
            "first_frame_wait_ticks": float(counters.first_frame_wait_ticks),
        }
        if lateness.size:
            extra["lateness_ms_p50"] = float(np.percentile(lateness, 50))
        if samples.finished_error_ms:
            extra["playback_finished_error_ms_last"] = samples.finished_error_ms[-1]
            extra["playback_finished_error_ms_max_abs"] = max(abs(v) for v in samples.finished_error_ms)
        extra.update(self.ingest_warnings)
        for ps in publisher_stats:
            extra[f"{ps.name}_frames_published"] = float(ps.frames_published)
            extra[f"{ps.name}_frames_dropped"] = float(ps.frames_dropped)
            extra[f"{ps.name}_audio_samples_published"] = float(ps.audio_samples_published)
            extra[f"{ps.name}_audio_samples_dropped"] = float(ps.audio_samples_dropped)
            extra[f"{ps.name}_connected"] = float(ps.connected)
            for key, value in ps.extra.items():  # e.g. a switchable output's `switches`
                extra[f"{ps.name}_{key}"] = value
        return SessionStats(
            session_id=self.session_id,
            output=",".join(ps.name for ps in publisher_stats),
            frames_published=counters.frames_published,
            speech_frames=counters.speech_frames,
            idle_frames=counters.idle_frames,
            dropped_frames=counters.render_misses + sum(ps.frames_dropped for ps in publisher_stats),
            audio_samples_received=accounting.received,
            audio_samples_rendered=accounting.rendered,
            audio_samples_pending=self.timeline.pending_samples,
            audio_samples_published=publisher_stats[0].audio_samples_published if publisher_stats else 0,
            audio_samples_rejected=accounting.rejected,
            audio_samples_flushed=accounting.flushed,
            ttff_ms=samples.ttff_ms[0] if samples.ttff_ms else None,
            lateness_ms_p99=float(np.percentile(lateness, 99)) if lateness.size else None,
            # The send-side A/V offset of the last frame sent, from the first output that measures it.
            av_offset_ms=next(
                (ps.extra["av_offset_ms"] for ps in publisher_stats if "av_offset_ms" in ps.extra), None
            ),
            # Switches away from a failed output; a return to the first output is counted as `*_switch_backs`.
            fallbacks=int(
                sum(
                    ps.extra.get("switches", 0.0) - ps.extra.get("switch_backs", 0.0)
                    for ps in publisher_stats
                )
            ),
            extra=extra,
        )


def _fade_in_delta(base: np.ndarray, delta: np.ndarray, weight: float) -> np.ndarray:
    """`base` + weight · `delta`: the last speech frame's mouth, faded, on the current idle frame (no ghosting
    of the body, which has moved on by a frame or two of the idle cycle)."""
    mixed = base.astype(np.float32) + delta.astype(np.float32) * weight
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
