"""Sidecar-side activities: what SessionWorkflow runs on one sidecar's own task queue.

Each activity translates the workflow contracts to `realtime.host` calls on the process's
`SessionHost` and back. They run once (the workflow sets maximum_attempts=1) and keep
heartbeating while they work, so a dead process is noticed within the policy's heartbeat
timeout. Every call names the sidecar incarnation it was placed on; a newer process under
the same id refuses it (`sidecar_restarted`) rather than act on a predecessor's session.

Control-plane outages: a live session does not depend on Temporal second by second. Each one
holds a contact lease here (`_Contact`), renewed whenever a stats report reaches the workflow.
If run_session is cut off by the server rather than cancelled by the workflow (its heartbeat
timed out while Temporal or the workers were unreachable), the session stays live, detached,
and the workflow's reconcile (run_session with `reattach`) picks it up again. Only when no
contact comes back within the policy's `control_plane_grace_s` does the sidecar end the session
itself; a later reconcile then fails `sidecar_session_gone` with the reason. See
docs/control-plane.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import fetch
from activities.control import ASSET_SUFFIXES
from activities.errors import AssetError, application_error_from, to_application_error
from activities.output_guard import checked_output_url
from realtime.host import (
    AvatarAsset,
    OpenedOutput,
    OutputTarget,
    PrepareProgress,
    RunLimits,
    SessionEndReason,
    SessionHost,
    SessionStats,
)
from realtime.outputs.errors import OutputError
from realtime.outputs.registry import OUTPUTS, AdmissionContext, UrlGuard
from workflows.contracts import (
    CONTROL_TASK_QUEUE,
    DEFAULT_POOL,
    PLACEMENT_WORKFLOW_ID,
    ActivityName,
    AvatarReady,
    EndReason,
    EngineReady,
    ErrorCode,
    FetchedAsset,
    OpenOutputInput,
    OutputOpened,
    PrepareAvatarInput,
    RunSessionInput,
    RunSessionResult,
    SidecarCall,
    StatsReport,
    StopSessionInput,
    SwitchOutputInput,
    TeardownInput,
    WarmUpInput,
    sidecar_task_queue,
)
from workflows.policy import FetchLimits

logger = logging.getLogger(__name__)

REPORT_STATS_SIGNAL = "report_stats"  # SessionWorkflow.report_stats


@dataclass(frozen=True)
class SidecarWorkerConfig:
    """How one sidecar process joins the Temporal side: its queue, registry, lease and secrets."""

    sidecar_id: str
    asset_dir: Path  # local copies of avatar assets, content-addressed
    task_queue: str = ""  # "" = sidecar_task_queue(sidecar_id), i.e. `sidecar-<id>`
    recordings_dir: Path | None = None  # MP4 recordings when a session asks for one
    control_task_queue: str = CONTROL_TASK_QUEUE  # where PlacementWorkflow runs
    placement_workflow_id: str = PLACEMENT_WORKFLOW_ID
    placement_shards: int = 1  # registries per pool (the control workers' --placement-shards)
    pool: str = DEFAULT_POOL  # e.g. GPU type and region; sessions ask for pools by policy
    lease_s: float = 15.0  # placement drops this sidecar this long after its last registration heartbeat
    registration_interval_s: float = 5.0
    livekit_api_key: str = ""
    livekit_api_secret: str = field(default="", repr=False)
    livekit_token_ttl_s: int = 6 * 3600
    asset_store_max_bytes: int = field(default_factory=fetch.asset_store_max_bytes)  # LRU cap of `asset_dir`

    @property
    def queue(self) -> str:
        return self.task_queue or sidecar_task_queue(self.sidecar_id)

    @classmethod
    def for_host(cls, host: SessionHost, asset_dir: Path, **overrides: Any) -> SidecarWorkerConfig:
        """Id and queue from the host's own Capacity (one source of truth); LiveKit credentials from
        LIVEKIT_API_KEY / LIVEKIT_API_SECRET (they never enter workflow history)."""
        capacity = host.capacity()
        values: dict[str, Any] = {
            "task_queue": capacity.task_queue,
            "livekit_api_key": os.environ.get("LIVEKIT_API_KEY", ""),
            "livekit_api_secret": os.environ.get("LIVEKIT_API_SECRET", ""),
        }
        values.update(overrides)
        return cls(sidecar_id=capacity.sidecar_id, asset_dir=asset_dir, **values)


# Sessions this sidecar ended on its own, remembered (by id) so a late reconcile learns why; oldest dropped
# first.
_GONE_MEMORY = 1000


@dataclass
class _Contact:
    """A live session's lease on the control plane, as this sidecar sees it."""

    grace_s: float
    last_contact_s: float = field(default_factory=time.monotonic)
    run: asyncio.Task[Any] | None = None  # the attached run_session, None while detached
    superseded: set[asyncio.Task[Any]] = field(default_factory=set)  # runs a reconcile took over from
    watchdog: asyncio.Task[None] | None = None


class SidecarActivities:
    def __init__(self, host: SessionHost, config: SidecarWorkerConfig, incarnation: str) -> None:
        self.host = host
        self.config = config
        self.incarnation = incarnation
        # Sessions placed here and not yet torn down: re-sent with each registration, so a registry that
        # dropped this sidecar during a Temporal outage gets their slots back when it re-registers.
        self.sessions_held: set[str] = set()
        self._contacts: dict[str, _Contact] = {}
        self._gone: dict[str, str] = {}  # session id -> why this sidecar ended it on its own

    def definitions(self) -> Sequence[Callable[..., Any]]:
        return [
            self.prepare_avatar,
            self.warm_up,
            self.open_output,
            self.switch_output,
            self.run_session,
            self.stop_session,
            self.teardown,
        ]

    @activity.defn(name=ActivityName.PREPARE_AVATAR.value)
    async def prepare_avatar(self, request: PrepareAvatarInput) -> AvatarReady:
        self._check_incarnation(request.call)
        self.sessions_held.add(request.call.session_id)
        self._gone.pop(request.call.session_id, None)  # placed here again: a new life for the session
        avatar = request.avatar
        async with self._shutdown_means_host_gone("prepare_avatar"), _keep_alive() as beat:
            path = await self._local_asset(avatar.asset, request.fetch)

            def on_progress(progress: PrepareProgress) -> None:
                beat(progress)

            try:
                prepared = await self.host.prepare_avatar(
                    request.call.session_id,
                    AvatarAsset(
                        path=path, kind=avatar.asset.kind.value, digest_sha256=avatar.asset.digest_sha256
                    ),
                    on_progress,
                )
            except Exception as exc:
                raise application_error_from(
                    exc, default_code=ErrorCode.SIDECAR_ERROR, context="prepare_avatar"
                ) from exc
        return AvatarReady(
            digest_sha256=prepared.digest_sha256,
            frame_count=prepared.frame_count,
            width_px=prepared.width_px,
            height_px=prepared.height_px,
            cache_hit=prepared.cache_hit,
        )

    @activity.defn(name=ActivityName.WARM_UP.value)
    async def warm_up(self, request: WarmUpInput) -> EngineReady:
        self._check_incarnation(request.call)
        async with self._shutdown_means_host_gone("warm_up"), _keep_alive():
            try:
                result = await self.host.warm_up()
            except Exception as exc:
                raise application_error_from(
                    exc, default_code=ErrorCode.SIDECAR_ERROR, context="warm_up"
                ) from exc
        return EngineReady(
            engine=result.engine,
            device=result.device,
            warm_up_ms=result.warm_up_ms,
            already_warm=result.already_warm,
        )

    @activity.defn(name=ActivityName.OPEN_OUTPUT.value)
    async def open_output(self, request: OpenOutputInput) -> OutputOpened:
        self._check_incarnation(request.call)
        target = await self._output_target(request)
        fallbacks = await self._fallback_targets(request)
        return await self._connect_output(
            "open_output",
            f"{request.spec.kind} output",
            lambda: self.host.open_output(
                request.call.session_id, target, fallbacks, switch_back_retry_s=request.switch_back_retry_s
            ),
        )

    async def _fallback_targets(self, request: OpenOutputInput) -> list[OutputTarget]:
        """Admit the outputs after the opened one now, so the sidecar's own failover needs no round trip.
        One refused here is left out (logged): the workflow's switch_output reports its error if it comes
        to it."""
        targets = []
        for spec in request.fallbacks:
            try:
                targets.append(
                    await self._output_target(dataclasses.replace(request, spec=spec, record=False))
                )
            except ApplicationError as exc:
                logger.warning(
                    "fallback output refused; the sidecar will not fail over to it",
                    extra={"session_id": request.call.session_id, "output": spec.kind, "error": exc.message},
                )
        return targets

    @activity.defn(name=ActivityName.SWITCH_OUTPUT.value)
    async def switch_output(self, request: SwitchOutputInput) -> OutputOpened:
        """Live fallback: the session's output failed while live; move it to `request.spec` in place."""
        self._check_incarnation(request.call)
        target = await self._output_target(
            OpenOutputInput(
                call=request.call,
                spec=request.spec,
                room=request.room,
                record=False,  # the recording opened with the session goes on; a switch does not start one
                allow_networks=request.allow_networks,
            )
        )
        return await self._connect_output(
            "switch_output",
            f"switch to {request.spec.kind} output",
            lambda: self.host.switch_output(request.call.session_id, target),
        )

    async def _connect_output(
        self, step: str, context: str, connect: Callable[[], Awaitable[OpenedOutput]]
    ) -> OutputOpened:
        """Await the host's open/switch with heartbeats; its typed failure becomes the activity's error
        code."""
        async with self._shutdown_means_host_gone(step), _keep_alive():
            try:
                opened = await connect()
            except Exception as exc:
                raise application_error_from(
                    exc, default_code=ErrorCode.OUTPUT_OPEN_FAILED, context=context
                ) from exc
        return OutputOpened(kind=opened.kind, detail=opened.detail)

    @activity.defn(name=ActivityName.RUN_SESSION.value)
    async def run_session(self, request: RunSessionInput) -> RunSessionResult:
        """Serve until the host ends the session; heartbeat details are its stats (the workflow's liveness
        signal).

        With `reattach` (the workflow's reconcile after this run went silent) it attaches to the session this
        sidecar kept live, taking over from a run the server already gave up on; a session it no longer has
        fails `sidecar_session_gone`.
        """
        self._check_incarnation(request.call)
        session_id = request.call.session_id
        contact = self._attach(session_id, request)
        run_task = asyncio.current_task()
        latest: list[SessionStats] = []
        reported = asyncio.Event()
        # The host may call on_stats from a task it started outside this activity (its session
        # clock); heartbeating needs this activity's context, so carry a copy of it.
        activity_context = contextvars.copy_context()

        urgent = asyncio.Event()

        def on_stats(stats: SessionStats) -> None:
            if latest and (latest[0].output, latest[0].fallbacks) != (stats.output, stats.fallbacks):
                # The output changed (the sidecar failed over or back): the workflow hears it now.
                urgent.set()
            latest[:] = [stats]
            activity_context.run(activity.heartbeat, dataclasses.asdict(stats))
            reported.set()

        reporter = asyncio.create_task(
            self._report_stats(latest, reported, urgent, request.stats_report_interval_s, contact)
        )
        limits = RunLimits(
            idle_timeout_s=request.idle_timeout_s,
            max_duration_s=request.max_duration_s,
            stats_interval_s=request.stats_interval_s,
        )
        try:
            end = await self.host.run_session(session_id, limits, on_stats)
        except asyncio.CancelledError:
            if run_task in contact.superseded:
                contact.superseded.discard(run_task)
                raise  # a reconcile took this session over: it is still live
            details = activity.cancellation_details()
            if activity.is_worker_shutdown():
                # This process is stopping: the session must move elsewhere, which the typed error tells it.
                with contextlib.suppress(Exception):
                    await self.host.stop_session(session_id, SessionEndReason.STOPPED)
                raise self._shutting_down("run_session") from None
            if details is not None and not details.cancel_requested:
                # The server gave up on this run (heartbeat timeout while Temporal or the workers were
                # unreachable), not the workflow: keep the session live for the reconcile.
                if contact.run is run_task:
                    contact.run = None
                logger.warning(
                    "run_session cut off by the server; the session stays live until the workflow reconciles",
                    extra={
                        "session_id": session_id,
                        "cancellation": str(details),
                        "control_plane_grace_s": contact.grace_s,
                    },
                )
                raise
            # The workflow cancelled the run (stop grace over, or the workflow itself cancelled).
            with contextlib.suppress(Exception):
                await self.host.stop_session(session_id, SessionEndReason.STOPPED)
            raise
        except Exception as exc:
            raise application_error_from(
                exc, default_code=ErrorCode.SIDECAR_ERROR, context="run_session"
            ) from exc
        finally:
            if contact.run is run_task:
                contact.run = None
            reporter.cancel()
            # Stats reports are best effort: a reporter that failed must not replace the run's outcome.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reporter
        gone = self._gone.get(session_id)
        if gone is not None:
            # This sidecar ended the session itself (out of contact past its grace), not the session's own
            # end: say so, should the result still reach the workflow.
            raise self._session_gone(session_id, gone)
        return RunSessionResult(
            end_reason=EndReason(end.reason.value), stats=dataclasses.asdict(end.stats), detail=end.detail
        )

    def _attach(self, session_id: str, request: RunSessionInput) -> _Contact:
        """The session's contact lease, renewed, with the calling run attached (a reconcile takes over)."""
        contact = self._contacts.get(session_id)
        if request.reattach:
            gone = self._gone.get(session_id)
            if gone is not None or contact is None:
                raise self._session_gone(session_id, gone or "it never served it or already tore it down")
        if contact is None:
            contact = self._contacts[session_id] = _Contact(grace_s=request.control_plane_grace_s)
        previous = contact.run
        if previous is not None and not previous.done():
            logger.info(
                "a reconcile takes the session over from a run the server gave up on",
                extra={"session_id": session_id},
            )
            contact.superseded.add(previous)
            previous.cancel()
        contact.run = asyncio.current_task()
        contact.grace_s = request.control_plane_grace_s
        contact.last_contact_s = time.monotonic()
        if contact.watchdog is None or contact.watchdog.done():
            contact.watchdog = asyncio.create_task(self._watch_contact(session_id, contact))
        return contact

    async def _watch_contact(self, session_id: str, contact: _Contact) -> None:
        """End the session once the control plane has been out of contact for longer than its grace."""
        while True:
            silent_s = time.monotonic() - contact.last_contact_s
            if silent_s >= contact.grace_s:
                break
            await asyncio.sleep(contact.grace_s - silent_s)
        reason = (
            f"it ended the session after {silent_s:.0f} s without contact with the control plane "
            f"(policy session.control_plane_grace_s = {contact.grace_s:g} s)"
        )
        logger.error(
            "control plane out of contact past its grace; ending the session",
            extra={"session_id": session_id, "silent_s": round(silent_s, 1)},
        )
        self._remember_gone(session_id, reason)
        self._contacts.pop(session_id, None)
        self.sessions_held.discard(session_id)
        try:
            await self.host.stop_session(session_id, SessionEndReason.STOPPED)
            await self.host.teardown(session_id)
        except Exception:
            logger.exception("ending a session out of contact failed", extra={"session_id": session_id})

    def _session_gone(self, session_id: str, reason: str) -> ApplicationError:
        return ApplicationError(
            f"sidecar {self.config.sidecar_id} no longer has session {session_id}: {reason}",
            type=ErrorCode.SIDECAR_SESSION_GONE.value,
            non_retryable=True,
        )

    def _remember_gone(self, session_id: str, reason: str) -> None:
        self._gone[session_id] = reason
        while len(self._gone) > _GONE_MEMORY:
            del self._gone[next(iter(self._gone))]

    def _forget(self, session_id: str) -> None:
        """The session was torn down on the workflow's word: nothing of it stays here."""
        self.sessions_held.discard(session_id)
        contact = self._contacts.pop(session_id, None)
        if contact is not None and contact.watchdog is not None:
            contact.watchdog.cancel()

    @activity.defn(name=ActivityName.STOP_SESSION.value)
    async def stop_session(self, request: StopSessionInput) -> bool:
        self._check_incarnation(request.call)
        try:
            reason = SessionEndReason(request.reason.value)
        except ValueError:
            reason = SessionEndReason.STOPPED
        try:
            await self.host.stop_session(request.call.session_id, reason)
        except Exception as exc:
            raise application_error_from(
                exc, default_code=ErrorCode.SIDECAR_ERROR, context="stop_session"
            ) from exc
        return True

    @activity.defn(name=ActivityName.TEARDOWN.value)
    async def teardown(self, request: TeardownInput) -> bool:
        if request.call.incarnation != self.incarnation:
            # Meant for a predecessor under this sidecar id: its sessions died with it.
            logger.info(
                "teardown for another incarnation ignored", extra={"session": request.call.session_id}
            )
            return False
        self._forget(request.call.session_id)
        async with _keep_alive():
            try:
                await self.host.teardown(request.call.session_id)
            except Exception as exc:
                raise application_error_from(
                    exc, default_code=ErrorCode.SIDECAR_ERROR, context="teardown"
                ) from exc
        return True

    # --- helpers ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _shutdown_means_host_gone(self, step: str) -> AsyncIterator[None]:
        """A step cut short because this process is stopping fails with `sidecar_shutting_down`.

        Reported as a plain cancellation instead, the workflow could not tell it from its own
        cancel; typed, it moves the session to another sidecar at once (policy permitting)
        rather than after a heartbeat timeout.
        """
        try:
            yield
        except asyncio.CancelledError:
            if activity.is_worker_shutdown():
                raise self._shutting_down(step) from None
            raise

    def _shutting_down(self, step: str) -> ApplicationError:
        return ApplicationError(
            f"sidecar {self.config.sidecar_id} is shutting down: {step} was cut short",
            type=ErrorCode.SIDECAR_SHUTTING_DOWN.value,
            non_retryable=True,
        )

    def _check_incarnation(self, call: SidecarCall) -> None:
        if call.incarnation != self.incarnation:
            raise ApplicationError(
                f"sidecar {self.config.sidecar_id} restarted: this call was placed on incarnation "
                f"{call.incarnation}, this process is {self.incarnation}",
                type=ErrorCode.SIDECAR_RESTARTED.value,
                non_retryable=True,
            )

    async def _local_asset(self, asset: FetchedAsset, limits: FetchLimits) -> Path:
        """The validated asset on this host's disk (its store kept within its cap, this file kept)."""
        path = await self._find_or_fetch(asset, limits)
        await asyncio.to_thread(
            fetch.keep_within_cap, path, self.config.asset_dir, self.config.asset_store_max_bytes
        )
        return path

    async def _find_or_fetch(self, asset: FetchedAsset, limits: FetchLimits) -> Path:
        """The validated asset on this host's disk: shared store, local copy, or a fresh download (digest
        checked)."""
        suffix = ASSET_SUFFIXES[asset.kind]
        local = self.config.asset_dir / f"{asset.digest_sha256}{suffix}"
        if await asyncio.to_thread(_has_digest, local, asset.digest_sha256):
            return local
        shared = Path(asset.stored_path)
        if await asyncio.to_thread(_has_digest, shared, asset.digest_sha256):
            await asyncio.to_thread(_copy_atomically, shared, local)
            return local
        try:
            download = await fetch.download(asset.source_url, limits, self.config.asset_dir, suffix=suffix)
        except AssetError as exc:
            raise to_application_error(exc) from exc
        if download.digest_sha256 != asset.digest_sha256:
            # Not the validated bytes: never used, so not kept.
            await asyncio.to_thread(download.path.unlink, missing_ok=True)
            raise ApplicationError(
                f"{asset.source_url} changed since it was validated (sha256 {download.digest_sha256}, "
                f"expected {asset.digest_sha256})",
                type=ErrorCode.ASSET_CHANGED.value,
                non_retryable=True,
            )
        return download.path

    async def _output_target(self, request: OpenOutputInput) -> OutputTarget:
        """Admit the spec through its registered kind: parameters parsed, the caller's URL through the SSRF
        guard, credentials minted. Every refusal is a non-retryable error with the kind's code."""
        record_path = None
        if request.record and self.config.recordings_dir is not None:
            record_path = self.config.recordings_dir / f"{request.call.session_id}.mp4"

        async def check_url(url: str, guard: UrlGuard) -> str:
            return await checked_output_url(url, guard, request.allow_networks)

        context = AdmissionContext(
            session_id=request.call.session_id,
            room=request.room,
            check_url=check_url,
            credentials={
                "LIVEKIT_API_KEY": self.config.livekit_api_key,
                "LIVEKIT_API_SECRET": self.config.livekit_api_secret,
            },
            token_ttl_s=self.config.livekit_token_ttl_s,
        )
        try:
            kind = OUTPUTS.get(request.spec.kind)
            target = await kind.admit(kind.parse(request.spec.params), context)
        except AssetError as exc:
            raise to_application_error(exc) from None
        except OutputError as exc:
            raise to_application_error(exc) from None
        return OutputTarget(kind.name, target, record_path=record_path)

    async def _report_stats(
        self,
        latest: list[SessionStats],
        reported: asyncio.Event,
        urgent: asyncio.Event,
        interval_s: float,
        contact: _Contact,
    ) -> None:
        """Push the latest stats into the workflow (for `status`) at the policy's report cadence, and at once
        when `urgent` is set; each report that reaches Temporal renews the session's contact lease."""
        info = activity.info()
        assert info.workflow_id is not None  # sidecar activities are always started by a workflow
        handle = activity.client().get_workflow_handle(info.workflow_id)
        while True:
            await reported.wait()
            reported.clear()
            try:
                await handle.signal(
                    REPORT_STATS_SIGNAL,
                    StatsReport(incarnation=self.incarnation, stats=dataclasses.asdict(latest[0])),
                )
                contact.last_contact_s = time.monotonic()
            except Exception as exc:  # the next report retries; stats are best effort
                logger.warning("stats report failed", extra={"workflow": info.workflow_id, "error": str(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(urgent.wait(), timeout=interval_s)
            urgent.clear()


@contextlib.asynccontextmanager
async def _keep_alive() -> AsyncIterator[Callable[[Any], None]]:
    """Heartbeat (latest details) a few times per heartbeat timeout while the body runs.

    The heartbeat proves the process is alive; a step that hangs is bounded by start-to-close.
    Yields a function the body calls with progress details.
    """
    timeout = activity.info().heartbeat_timeout
    interval_s = timeout.total_seconds() / 3 if timeout else 5.0
    details: list[Any] = []
    # A host may report progress from callbacks it schedules itself (SidecarHost's render lane
    # thread -> loop.call_soon_threadsafe), outside this activity's context: heartbeat in a copy of it.
    activity_context = contextvars.copy_context()

    def beat(progress: Any) -> None:
        details[:] = [progress]
        activity_context.run(activity.heartbeat, progress)

    async def ticker() -> None:
        while True:
            activity.heartbeat(*details)
            await asyncio.sleep(interval_s)

    task = asyncio.create_task(ticker())
    try:
        yield beat
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _has_digest(path: Path, digest: str) -> bool:
    return path.is_file() and fetch.sha256_of(path) == digest


def _copy_atomically(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".partial-{os.getpid()}-{destination.name}")
    shutil.copyfile(source, partial)
    os.replace(partial, destination)
