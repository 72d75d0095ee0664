"""`SidecarHost`: the `realtime.host.SessionHost` implementation — one engine, many sessions.

The Temporal activities on this sidecar's task queue call these methods in the order of the
session lifecycle: prepare_avatar -> warm_up -> open_output -> run_session -> teardown
(stop_session may come at any time). The session's clock starts when its output opens (the
room sees idle frames at once); run_session only watches it and reports stats.

A session holds one of `slots_total` slots from prepare_avatar until teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from realtime.heap import GcPauses, freeze_long_lived
from realtime.host import (
    AvatarAsset,
    Capacity,
    OpenedOutput,
    OutputTarget,
    PreparedAvatar,
    PrepareProgress,
    RunLimits,
    SessionEnd,
    SessionEndReason,
    SessionStats,
    WarmUpResult,
)
from realtime.ingest.agents import AgentAudioBridge
from realtime.ingest.formats import FRAME_RATE_FPS
from realtime.outputs.base import AgentRoomPublisher, Publisher
from realtime.outputs.recording import RecordingOutput
from realtime.outputs.registry import OUTPUTS, PublisherContext
from realtime.outputs.switch import SwitchableOutput
from realtime.sidecar.config import HostConfig
from realtime.sidecar.engine_port import EngineService, EngineStatus
from realtime.sidecar.errors import (
    NoFreeSlot,
    OutputAlreadyOpen,
    OutputUnsupported,
    SessionNotPrepared,
    UnknownSession,
)
from realtime.sidecar.failover import FailoverPlan, OutputWatch
from realtime.sidecar.render_lane import BACKGROUND_DEADLINE_S, RenderLane
from realtime.sidecar.runtime import SessionRuntime

logger = logging.getLogger(__name__)


@dataclass
class HostedSession:
    session_id: str
    created_at_s: float = field(default_factory=time.monotonic)
    prepared: PreparedAvatar | None = None
    avatar: object | None = None
    runtime: SessionRuntime | None = None
    publishers: list[Publisher] = field(default_factory=list)
    bridge: AgentAudioBridge | None = None
    output: OpenedOutput | None = None
    live_output: SwitchableOutput | None = None  # the live output (LiveKit or RTMP), switchable while live
    stop_reason: SessionEndReason | None = None
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)  # set once `runtime` runs (output open)
    audio_clients: int = 0  # WS connections + agent streams open now
    had_audio_client: bool = False
    output_down_since_s: float | None = None
    failover: FailoverPlan | None = None  # the live output's admitted fallbacks (realtime.sidecar.failover)
    watch: asyncio.Task[None] | None = None  # the OutputWatch that fails the live output over
    end_detail: str = ""  # why the session ended, when its end reason alone does not say


class SidecarHost:
    def __init__(self, engine: EngineService, config: HostConfig | None = None) -> None:
        self.engine = engine
        self.config = config or HostConfig()
        self.sessions: dict[str, HostedSession] = {}
        self._lane: RenderLane | None = None
        self._warm_lock = asyncio.Lock()
        # Timed while the sidecar serves (process.serve installs it); /healthz reports it.
        self.gc_pauses = GcPauses()

    @property
    def lane(self) -> RenderLane:
        if self._lane is None:
            # prepare: the engine adapter batches all jobs' audio features into one encode (when it can).
            self._lane = RenderLane(
                self.engine.render,
                start_render=self.engine.render_async,
                prepare=getattr(self.engine, "prepare_features", None),
                max_batch_frames=self.config.max_batch_frames,
            )
        return self._lane

    # ---- SessionHost ----------------------------------------------------------------------

    def capacity(self) -> Capacity:
        slots = self.slots_total()
        return Capacity(
            sidecar_id=self.config.sidecar_id,
            task_queue=self.config.task_queue,
            slots_total=slots,
            slots_free=max(0, slots - len(self.sessions)),
        )

    def lane_report(self) -> dict[str, Any] | None:
        """The render lane's counters and measured batch times (None before the engine was first used)."""
        if self._lane is None:
            return None
        return self._lane.report(max_batch_ms=self.config.runtime.max_batch_ms)

    def slots_total(self) -> int:
        """Configured slots, lowered to what the render lane's measured batch times sustain (admission
        control):
        a saturated sidecar refuses new sessions rather than letting every session on it drop frames."""
        max_batch_ms = self.config.runtime.max_batch_ms
        fps_per_session = FRAME_RATE_FPS * self.config.speech_duty  # idle frames cost the lane nothing
        measured = (
            self._lane.capacity_sessions(fps_per_session, max_batch_ms=max_batch_ms)
            if self._lane is not None
            else None
        )
        if measured is None:
            return self.config.slots_total
        # Never below the sessions already here (they keep their slots) nor below one (a sidecar serves one).
        return max(1, min(self.config.slots_total, max(measured, 0)))

    async def prepare_avatar(
        self, session_id: str, asset: AvatarAsset, on_progress: Callable[[PrepareProgress], None]
    ) -> PreparedAvatar:
        session = self.sessions.get(session_id)
        if session is None:
            slots = self.slots_total()
            if len(self.sessions) >= slots:
                raise NoFreeSlot(
                    f"sidecar {self.config.sidecar_id} has all {slots} slots in use "
                    f"({self.config.slots_total} configured, capacity measured by its render lane)"
                )
            session = HostedSession(session_id)
            self.sessions[session_id] = session
        loop = asyncio.get_running_loop()

        def progress_from_thread(progress: PrepareProgress) -> None:
            loop.call_soon_threadsafe(on_progress, progress)

        try:
            # On the lane: the engine is single-threaded; live sessions' frames go first.
            prepared, avatar = await self.lane.call(
                BACKGROUND_DEADLINE_S, lambda: self.engine.prepare_avatar(asset, progress_from_thread)
            )
        except Exception:
            if session.runtime is None:
                self.sessions.pop(session_id, None)  # nothing else holds the slot
                session.stop_event.set()  # an audio connection waiting for its output stops waiting
            raise
        session.prepared, session.avatar = prepared, avatar
        return prepared

    async def warm_up(self) -> WarmUpResult:
        started = time.perf_counter()
        info = self.engine.info()
        if info.warm:
            # Nothing to run: answered here, not on the render lane, where it would queue behind the live
            # sessions' frames and the other starts' avatar preparations (a session's start waits on it).
            return WarmUpResult(
                engine=info.name,
                device=info.device,
                warm_up_ms=(time.perf_counter() - started) * 1000.0,
                already_warm=True,
            )
        async with self._warm_lock:
            already = await self.lane.call(BACKGROUND_DEADLINE_S, self.engine.warm_up)
            if not already:
                # The lane's cost model starts from the warm-up's batch times: admission control and the
                # planning budget know the GPU's capacity before the first session (render only: the first
                # real batches, feature work included, move the estimates on; skipping late frames waits for
                # those).
                for frames, batch_ms in self.engine.warm_up_batch_ms().items():
                    self.lane.cost_model.observe(frames, batch_ms)
                # What loading left (modules, models, compiled graphs) lives as long as the process: out of
                # every later full collection's scan (realtime.heap). No session renders before this, so the
                # collection's own pause stalls none.
                freeze_long_lived(collect_first=True)
            info = self.engine.info()
            return WarmUpResult(
                engine=info.name,
                device=info.device,
                warm_up_ms=(time.perf_counter() - started) * 1000.0,
                already_warm=already,
            )

    async def open_output(
        self,
        session_id: str,
        target: OutputTarget,
        fallbacks: Sequence[OutputTarget] = (),
        switch_back_retry_s: float = 0.0,
    ) -> OpenedOutput:
        """Open the live output (any registered kind) and, with `target.record_path`, an MP4 recording beside
        it.

        fallbacks: the admitted outputs that follow it in the session's fallback order; the sidecar fails over
        to them itself (realtime.sidecar.failover) and, with `switch_back_retry_s` > 0, returns to `target`
        once it opens again."""
        session = self._session(session_id)
        if session.avatar is None or session.prepared is None:
            raise SessionNotPrepared(
                f"session {session_id} has no prepared avatar: call prepare_avatar first"
            )
        publisher, opened = self._make_publisher(session_id, target, session.prepared)
        live = SwitchableOutput(publisher)
        publishers: list[Publisher] = [live]
        if target.record_path is not None:
            width_px, height_px = _even_size(session.prepared)
            publishers.append(RecordingOutput(target.record_path, width_px, height_px))
        await self.start_publishing(session_id, publishers, opened)
        session.live_output = live
        session.failover = FailoverPlan(
            [OutputTarget(target.kind, target.target), *fallbacks], switch_back_retry_s=switch_back_retry_s
        )
        self._attach_agent_bridge(session, publisher)
        self._watch_output(session)
        return opened

    def _watch_output(self, session: HostedSession) -> None:
        """(Re)start the session's OutputWatch: it ends the session `output_failed` when no fallback opens."""
        if session.live_output is None or session.failover is None:
            return
        if session.watch is not None and not session.watch.done():
            return
        session_id = session.session_id

        def make_publisher(target: OutputTarget) -> tuple[Publisher, OpenedOutput]:
            assert session.prepared is not None
            return self._make_publisher(session_id, target, session.prepared)

        def failed(detail: str) -> None:
            session.end_detail = detail
            session.stop_reason = session.stop_reason or SessionEndReason.OUTPUT_FAILED
            session.stop_event.set()

        watch = OutputWatch(
            session_id,
            session.live_output,
            session.failover,
            make_publisher,
            down_timeout_s=lambda: self.config.output_down_timeout_s,
            stopping=lambda: session.stop_reason is not None or self.sessions.get(session_id) is not session,
            on_switched=lambda publisher, opened: self._switched(session, publisher, opened),
            on_failed=failed,
        )
        session.watch = asyncio.get_running_loop().create_task(watch.run(), name=f"output-watch-{session_id}")

    async def switch_output(self, session_id: str, target: OutputTarget) -> OpenedOutput:
        """Move a live session to another output without restarting it: the clock, the audio
        queue and the recording go on; the new output is connected before the old one is closed, so a failed
        switch (raised) leaves the session on its current output. Visible in stats as `fallbacks`."""
        session = self._session(session_id)
        if session.live_output is None or session.prepared is None or session.runtime is None:
            raise SessionNotPrepared(
                f"session {session_id} has no open output to switch: call open_output first"
            )
        publisher, opened = self._make_publisher(session_id, target, session.prepared)
        # Raises when the new output cannot open: the session stays on its output, agent bridge included.
        await session.live_output.switch_to(publisher)
        await self._switched(session, publisher, opened)
        session.output_down_since_s = None
        if session.failover is not None:
            plan = session.failover
            kinds = [t.kind for t in plan.targets]
            if target.kind in kinds:
                plan.current = kinds.index(target.kind)
                plan.targets[plan.current] = OutputTarget(target.kind, target.target)
        if session.stop_reason is SessionEndReason.OUTPUT_FAILED:
            # The run that ended because the old output failed is over; the next run_session serves the new
            # one.
            session.stop_reason = None
            session.end_detail = ""
            session.stop_event.clear()
            self._watch_output(session)
        logger.info("session output switched", extra={"session_id": session_id, "output": opened.detail})
        return opened

    async def _switched(self, session: HostedSession, publisher: Publisher, opened: OpenedOutput) -> None:
        """The live output is now `publisher`: an agent bridge follows it to its room."""
        if session.bridge is not None:
            bridge, session.bridge = session.bridge, None
            try:
                await bridge.close()  # the agent's room was the old output's
            except Exception:
                logger.exception("closing the agent bridge failed", extra={"session_id": session.session_id})
        session.output = opened
        self._attach_agent_bridge(session, publisher)

    def _attach_agent_bridge(self, session: HostedSession, publisher: Publisher) -> None:
        if isinstance(publisher, AgentRoomPublisher) and session.runtime is not None:
            bridge = AgentAudioBridge(session.runtime, publisher.agent_identity)
            session.bridge = bridge
            publisher.on_room(bridge.attach)

    async def start_publishing(
        self, session_id: str, publishers: list[Publisher], opened: OpenedOutput
    ) -> None:
        """Start `publishers` (any `realtime.outputs.base.Publisher`) and the session's clock."""
        session = self._session(session_id)
        if session.avatar is None:
            raise SessionNotPrepared(
                f"session {session_id} has no prepared avatar: call prepare_avatar first"
            )
        if session.runtime is not None:
            raise OutputAlreadyOpen(f"session {session_id} already publishes to {session.output}")
        started: list[Publisher] = []
        try:
            for publisher in publishers:
                await (
                    publisher.start()
                )  # raises a typed OutputError: the workflow applies its fallback policy
                started.append(publisher)
            engine_view = self.engine.open_session(session.avatar)
        except BaseException:
            # Nothing holds the started outputs yet (teardown would not see them): close them here.
            for publisher in started:
                try:
                    await publisher.close()
                except Exception:
                    logger.exception(
                        "closing an output after a failed open failed", extra={"session_id": session_id}
                    )
            raise
        runtime = SessionRuntime(session_id, engine_view, publishers, self.lane, self.config.runtime)
        session.runtime, session.publishers, session.output = runtime, publishers, opened
        await runtime.start()
        session.opened.set()
        logger.info("session output open", extra={"session_id": session_id, "output": opened.detail})

    def _make_publisher(
        self, session_id: str, target: OutputTarget, prepared: PreparedAvatar
    ) -> tuple[Publisher, OpenedOutput]:
        kind = OUTPUTS.get(target.kind)  # raises OutputKindUnknown
        if not isinstance(target.target, kind.target_type):
            raise OutputUnsupported(
                f"output kind {kind.name!r} takes a {kind.target_type.__name__}, not "
                f"{type(target.target).__name__}"
            )
        # H.264 (RTMP) and LiveKit's encoders need even sizes: an odd avatar loses its last row/column.
        width_px, height_px = _even_size(prepared)
        context = PublisherContext(
            session_id=session_id,
            width_px=width_px,
            height_px=height_px,
            video_delay_ms=self.config.video_delay_ms,
            max_video_bitrate_bps=self.config.max_video_bitrate_bps,
            renew_audio_after_stall_ms=self.config.renew_audio_after_stall_ms,
            idle_audio_reserve_ms=self.config.idle_audio_reserve_ms,
        )
        opened = kind.open(target.target, context)  # raises a typed OutputError (e.g. a malformed URL)
        return opened.publisher, OpenedOutput(kind.name, opened.detail)

    async def run_session(
        self, session_id: str, limits: RunLimits, on_stats: Callable[[SessionStats], None]
    ) -> SessionEnd:
        session = self._session(session_id)
        runtime = session.runtime
        if runtime is None:
            raise SessionNotPrepared(f"session {session_id} has no open output: call open_output first")
        started_s = time.monotonic()
        next_stats_s = started_s
        switches_seen = session.live_output.switches if session.live_output is not None else 0
        while True:
            now = time.monotonic()
            reason = session.stop_reason or self._end_reason(session, runtime, limits, started_s, now)
            if reason is not None:
                session.stop_reason = reason
                stats = self._stats(session, runtime)
                on_stats(stats)
                logger.info("session ends", extra={"session_id": session_id, "reason": str(reason)})
                return SessionEnd(
                    reason=reason, stats=stats, detail=runtime.task_failure or session.end_detail
                )
            live = session.live_output
            if now >= next_stats_s or (live is not None and live.switches != switches_seen):
                # A switch (the sidecar's own failover) is reported at once: the workflow's status follows it.
                switches_seen = live.switches if live is not None else 0
                on_stats(self._stats(session, runtime))
                next_stats_s = now + limits.stats_interval_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.stop_event.wait(), timeout=min(0.25, limits.stats_interval_s))

    def _stats(self, session: HostedSession, runtime: SessionRuntime) -> SessionStats:
        stats = runtime.stats()
        stats.output_detail = session.output.detail if session.output is not None else ""
        if session.failover is not None:
            # The latest failover's steps, on the sidecar's clocks.
            stats.extra.update(session.failover.timings)
        return stats

    def _end_reason(
        self, session: HostedSession, runtime: SessionRuntime, limits: RunLimits, started_s: float, now: float
    ) -> SessionEndReason | None:
        if runtime.task_failure is not None:
            # No clock or no rendering: nothing reaches the room any more. End now with the reason, rather
            # than look live until the idle timeout or the maximum duration.
            return SessionEndReason.RUNTIME_FAILED
        if now - started_s >= limits.max_duration_s:
            return SessionEndReason.MAX_DURATION
        # The live output's failure is its OutputWatch's to handle (fail over, or end the session).
        watched = session.watch is not None
        publisher_stats = [
            p.stats() for p in session.publishers if not (watched and p is session.live_output)
        ]
        if any(ps.extra.get("final_disconnect") for ps in publisher_stats):
            # Removed from the room / room closed: it will not come back, so waiting out the timeout only
            # delays the workflow's fallback (or the end of the session).
            return SessionEndReason.OUTPUT_FAILED
        if any(not ps.connected for ps in publisher_stats):
            session.output_down_since_s = session.output_down_since_s or now
            if now - session.output_down_since_s >= self.config.output_down_timeout_s:
                return SessionEndReason.OUTPUT_FAILED
        else:
            session.output_down_since_s = None
        if runtime.playing or runtime.timeline.pending_samples or session.audio_clients:
            return None
        last_activity = max(runtime.last_audio_at_s or started_s, started_s)
        if now - last_activity >= limits.idle_timeout_s:
            return SessionEndReason.CLIENT_GONE if session.had_audio_client else SessionEndReason.IDLE_TIMEOUT
        return None

    async def stop_session(self, session_id: str, reason: SessionEndReason) -> None:
        session = self.sessions.get(session_id)
        if session is None:
            return
        session.stop_reason = session.stop_reason or reason
        session.stop_event.set()

    async def teardown(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        session.stop_reason = session.stop_reason or SessionEndReason.STOPPED
        session.stop_event.set()
        if session.watch is not None:
            session.watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await session.watch
        # Each step is guarded: one failing must not leave the publishers (a LiveKit participant) connected.
        if session.bridge is not None:
            try:
                await session.bridge.close()
            except Exception:
                logger.exception("closing the agent bridge failed", extra={"session_id": session_id})
        if session.runtime is not None:
            try:
                await session.runtime.stop()
            except Exception:
                logger.exception("stopping the session runtime failed", extra={"session_id": session_id})
        for publisher in session.publishers:
            try:
                await publisher.close()
            except Exception:
                logger.exception("closing a publisher failed", extra={"session_id": session_id})
        avatar = session.avatar
        if (
            avatar is not None
            and self._lane is not None
            and not any(s.avatar is avatar for s in self.sessions.values())
        ):
            try:
                await self._lane.call(BACKGROUND_DEADLINE_S, lambda: self.engine.release_avatar(avatar))
            except Exception:
                logger.exception("releasing the avatar failed", extra={"session_id": session_id})
        logger.info("session torn down", extra={"session_id": session_id})

    # ---- for the server -------------------------------------------------------------------

    def _session(self, session_id: str) -> HostedSession:
        session = self.sessions.get(session_id)
        if session is None:
            raise UnknownSession(f"no session {session_id} on sidecar {self.config.sidecar_id}")
        return session

    def runtime(self, session_id: str) -> SessionRuntime | None:
        session = self.sessions.get(session_id)
        return session.runtime if session is not None else None

    async def wait_runtime(self, session_id: str, timeout_s: float) -> SessionRuntime | None:
        session = self.sessions.get(session_id)
        if session is None:
            return None
        if not session.opened.is_set():
            waits = [
                asyncio.ensure_future(session.opened.wait()),
                asyncio.ensure_future(session.stop_event.wait()),
            ]
            try:
                await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
        if self.sessions.get(session_id) is not session or session.stop_reason is not None:
            return None
        return session.runtime if session.opened.is_set() else None

    def audio_client_joined(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            session.audio_clients += 1
            session.had_audio_client = True

    def audio_client_left(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            session.audio_clients = max(0, session.audio_clients - 1)

    async def wait_session_end(self, session_id: str) -> None:
        """Return once the session has stopped (at once for an unknown session)."""
        session = self.sessions.get(session_id)
        if session is not None:
            await session.stop_event.wait()

    def engine_info(self) -> EngineStatus:
        return self.engine.info()

    async def close(self) -> None:
        for session_id in list(self.sessions):
            await self.teardown(session_id)
        if self._lane is not None:
            self._lane.close()
            self._lane = None


def _even_size(prepared: PreparedAvatar) -> tuple[int, int]:
    return prepared.width_px - prepared.width_px % 2, prepared.height_px - prepared.height_px % 2
