"""SessionWorkflow: one talking-avatar session, from asset URL to teardown (workflow id `session-<id>`).

fetch_assets → validate_assets (a local activity) → place_session → prepare_avatar with warm_up
beside it → open_output (the policy's fallback order, e.g. LiveKit then RTMP) → run_session
(long, heartbeating stats on the sidecar) → teardown + release_slot, always, from `finally`. When the output
fails while live (run_session ends `output_failed`), switch_output moves the session to the
next output of the fallback order on the same sidecar, and it runs on.

Host failure: sidecar activities run on that sidecar's own queue with one attempt and a
schedule-to-start bound, and the long ones heartbeat; a timeout of any of them means the
host went silent. The policy then re-places the session on another sidecar (the validated
avatar is reused; fetch and validation are not repeated) or ends it with `sidecar_lost`.

Limits: the sidecar enforces idle timeout and max duration at sample precision; the
workflow enforces them too, with durable timers, so they hold across re-placements and
even if a host misbehaves (the idle backstop waits one stats report longer, since the
workflow learns of audio only through reports).

Interface: update `stop` / signal `request_stop` (StopRequest), signal `report_stats`
(from run_session), query `status` (SessionStatus). Search attributes room, phase, output,
sidecar are upserted at every phase. Failures end the workflow with an ApplicationError
whose type is the reason code (visible in the Temporal UI); `status.error` carries it too.

Sandbox-safe: imports only temporalio and the workflows contracts.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeUpdate
from temporalio.exceptions import ActivityError, ApplicationError, FailureError, TimeoutType
from temporalio.exceptions import CancelledError as ActivityCancelledError
from temporalio.exceptions import TimeoutError as ActivityTimeoutError

from workflows import search_attributes
from workflows.contracts import (
    ActivityName,
    AvatarReady,
    EndReason,
    EngineReady,
    ErrorCode,
    ErrorInfo,
    FetchAssetsInput,
    FetchedAsset,
    OpenOutputInput,
    OutputAttempt,
    OutputOpened,
    OutputSpec,
    Phase,
    Placement,
    PlaceSessionInput,
    PrepareAvatarInput,
    ReleaseSlotInput,
    RunSessionInput,
    RunSessionResult,
    SessionInput,
    SessionResult,
    SessionStatus,
    SidecarCall,
    SidecarLoss,
    StatsReport,
    StopRequest,
    StopSessionInput,
    SwitchOutputInput,
    TeardownInput,
    ValidateAssetsInput,
    ValidatedAvatar,
    WarmUpInput,
)
from workflows.policy import ControlActivityPolicy, SidecarActivityPolicy, SidecarLostAction

ResultT = TypeVar("ResultT")

# A retry on a sidecar queue would go to the same (possibly dead) host: the workflow decides instead.
_SINGLE_ATTEMPT = RetryPolicy(maximum_attempts=1)
# Wait for the sidecar to acknowledge a cancel, so teardown never overtakes a still-running step
# there; a dead host cannot acknowledge, and its heartbeat/schedule-to-start timeouts bound the wait.
_SIDECAR_CANCELLATION = workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
_OUTPUT_FAILURE_ENDS = frozenset({EndReason.OUTPUT_FAILED})
# The start path that sessions started by this code take (histories without its marker replay the older
# one): validate_assets runs as a local activity (a short check, no workflow task of its own) and
# warm_up runs beside prepare_avatar instead of after it.
_PATCH_QUICK_START = "quick-start-v1"
# Sessions started by this code ask a bring-up step that no worker picked up once more before the host counts
# as lost (`_on_sidecar`); histories without the marker replay the older path (lost at the first timeout).
_PATCH_ASK_AGAIN = "bring-up-ask-again-v1"
# The steps asked again: they have not started when their schedule-to-start timeout fires, so a second
# schedule runs them once. Ending steps (stop, teardown) are bounded by their own timeouts and fallbacks.
_ASKED_AGAIN_STEPS = frozenset({ActivityName.PREPARE_AVATAR, ActivityName.WARM_UP, ActivityName.OPEN_OUTPUT})
# Failures that say the host itself is gone (not this step): the session may move to another sidecar.
_HOST_GONE_CODES = frozenset(
    {
        ErrorCode.SIDECAR_RESTARTED.value,
        ErrorCode.SIDECAR_SHUTTING_DOWN.value,
        # Alive, but it no longer has the session (it ended it after losing the control plane for its grace).
        ErrorCode.SIDECAR_SESSION_GONE.value,
    }
)


class _SessionFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class _SidecarLost(Exception):
    def __init__(self, loss: SidecarLoss) -> None:
        super().__init__(f"sidecar {loss.sidecar_id} lost ({loss.timeout_type})")
        self.loss = loss


class _RunWentSilent(Exception):
    """run_session's heartbeat timed out: the sidecar is suspect, not yet lost (see _run_on_sidecar)."""

    def __init__(self, loss: SidecarLoss) -> None:
        super().__init__(f"run_session on {loss.sidecar_id} went silent")
        self.loss = loss


class _Stopped(Exception):
    """A stop arrived while a pre-live step was running; that step was cancelled."""


@workflow.defn
class SessionWorkflow:
    @workflow.init
    def __init__(self, session_input: SessionInput) -> None:
        self._request = session_input.request
        self._policy = session_input.policy
        self._status = SessionStatus(session_id=self._request.session_id, room=self._request.room)
        self._stop_reason: EndReason | None = None
        self._placement: Placement | None = None
        self._output_index: int | None = None  # position of the open output in _output_specs()
        # True from the first place_session on: its acquire may land even if the step is then
        # cancelled or fails, so teardown releases (idempotently) whenever one was started.
        self._may_hold_slot = False
        # The registry holding the slot once a placement returned; "" while unknown (release asks every one).
        self._slot_registry = ""
        self._avatar: ValidatedAvatar | None = None
        self._lost_incarnations: list[str] = []
        self._zombie_teardowns: list[workflow.ActivityHandle[bool]] = []
        self._audio_samples_seen = 0
        self._last_audio_at: datetime | None = None
        self._live_since: datetime | None = None
        self._last_silence: SidecarLoss | None = None

    @workflow.run
    async def run(self, session_input: SessionInput) -> SessionResult:
        cancelled = False
        evicted = False
        try:
            await self._lifecycle()
        except _SessionFailed as failure:
            workflow.logger.warning("session failed", extra={"code": failure.code, "reason": failure.message})
            self._status.error = ErrorInfo(code=failure.code, message=failure.message)
            self._status.end_reason = EndReason.FAILED
        except asyncio.CancelledError:
            if workflow.cancellation_reason() is None:
                # Not a cancel of this workflow (the inner steps never leak one): the worker is evicting
                # it from its cache. The session goes on, rebuilt from history by the next worker, so
                # nothing may be torn down here (and workflow APIs may no longer be called).
                evicted = True
                raise
            cancelled = True
            self._status.end_reason = EndReason.CANCELLED
        except BaseException as err:
            if not isinstance(err, Exception):
                # Not an outcome of the session (those are Exceptions, or the cancel above): the SDK is
                # tearing the workflow's coroutine down. An eviction ends each pending step with its own
                # BaseException (awaiting a step's handle re-raises it), and a coroutine closed before it
                # finished gets GeneratorExit. Either way the session goes on elsewhere: no teardown.
                evicted = True
            raise
        finally:
            if not evicted:
                await self._teardown_shielded()

        if self._status.error is not None:
            self._enter(Phase.FAILED)
            raise ApplicationError(
                self._status.error.message, type=self._status.error.code, non_retryable=True
            )
        if cancelled:
            self._enter(Phase.CANCELLED)
            raise asyncio.CancelledError("session workflow cancelled")
        self._enter(Phase.COMPLETED)
        return SessionResult(
            session_id=self._request.session_id,
            end_reason=self._status.end_reason or EndReason.STOPPED,
            output=self._status.output,
            sidecar=self._status.sidecar,
            replacements=self._status.replacements,
            stats=self._status.stats,
        )

    # --- interface ----------------------------------------------------------------------

    @workflow.update
    def stop(self, request: StopRequest) -> SessionStatus:
        """End the session (reason `stopped`); returns the status at the moment the stop was accepted."""
        self._accept_stop(request)
        return self._status

    @workflow.signal
    def request_stop(self, request: StopRequest) -> None:
        """Fire-and-forget form of `stop` (e.g. from the Temporal UI or CLI)."""
        self._accept_stop(request)

    @workflow.signal
    def report_stats(self, report: StatsReport) -> None:
        if self._placement is None or report.incarnation != self._placement.incarnation:
            return  # a late report from a sidecar this session has left
        now = workflow.now()
        self._status.stats = report.stats
        self._status.stats_reported_at = now.isoformat()
        received = report.stats.get("audio_samples_received")
        if isinstance(received, int) and received > self._audio_samples_seen:
            self._audio_samples_seen = received
            self._last_audio_at = now
        self._follow_sidecar_switch(report.stats)

    def _follow_sidecar_switch(self, stats: dict[str, Any]) -> None:
        """The sidecar moved a live session's output itself (failover to the next output, or back to the
        first): status, the output attempts and the search attributes follow what it reports. The live output
        is the first name of the stats' `output`. Outside LIVE the workflow's own open/switch is in flight and
        records its outcome itself."""
        live_output = str(stats.get("output") or "").split(",")[0]
        if self._status.phase is not Phase.LIVE or not live_output or live_output == self._status.output:
            return
        kinds = [spec.kind for spec in self._output_specs()]
        if live_output not in kinds:
            return
        self._output_index = kinds.index(live_output)
        self._status.output_attempts.append(
            OutputAttempt(kind=live_output, sidecar_id=self._status.sidecar, ok=True, live_switch=True)
        )
        workflow.logger.info(
            "the sidecar switched the live output", extra={"from": self._status.output, "to": live_output}
        )
        self._status.output = live_output
        self._status.output_detail = str(stats.get("output_detail") or "")
        self._upsert_search_attributes()

    @workflow.query
    def status(self) -> SessionStatus:
        return self._status

    # --- lifecycle ----------------------------------------------------------------------

    async def _lifecycle(self) -> None:
        self._upsert_search_attributes()
        self._check_request()
        activities = self._policy.activities
        assets = self._policy.assets
        try:
            self._enter(Phase.FETCHING)
            asset = await self._control(
                ActivityName.FETCH_ASSETS,
                FetchAssetsInput(
                    session_id=self._request.session_id, source=self._request.avatar, limits=assets.fetch
                ),
                FetchedAsset,
                activities.fetch_assets,
            )
            self._enter(Phase.VALIDATING)
            self._avatar = await self._control(
                ActivityName.VALIDATE_ASSETS,
                ValidateAssetsInput(
                    session_id=self._request.session_id,
                    asset=asset,
                    zip=assets.zip,
                    frames=assets.frames,
                    video=assets.video,
                ),
                ValidatedAvatar,
                activities.validate_assets,
                local=workflow.patched(_PATCH_QUICK_START),
            )
            await self._bring_up()
            await self._serve()
        except _Stopped:
            self._status.end_reason = self._stop_reason or EndReason.STOPPED

    def _check_request(self) -> None:
        request = self._request
        problems = []
        if not request.session_id:
            problems.append("session_id is empty")
        if not request.room:
            problems.append("room is empty")
        if not request.avatar.url:
            problems.append("avatar.url is empty")
        if not self._output_specs():
            offered = [spec.kind for spec in request.output.offered()]
            order = list(self._policy.outputs.fallback_order)
            problems.append(f"no requested output {offered} is in the policy's fallback order {order}")
        if problems:
            raise _SessionFailed(ErrorCode.INVALID_REQUEST, "; ".join(problems))

    async def _bring_up(self) -> None:
        """Place the session on a sidecar and get it ready to go live; re-place on host loss per policy."""
        activities = self._policy.activities
        assert self._avatar is not None
        while True:
            self._enter(Phase.PLACING)
            self._may_hold_slot = True
            previous_registry, self._slot_registry = self._slot_registry, ""
            placement = await self._control(
                ActivityName.PLACE_SESSION,
                PlaceSessionInput(
                    session_id=self._request.session_id,
                    exclude_incarnations=list(self._lost_incarnations),
                    pools=list(self._policy.placement.pools),
                    avatar_key=self._avatar.asset.digest_sha256,
                    previous_registry_id=previous_registry,
                ),
                Placement,
                activities.place_session,
                # A cancelled place_session may still be acquiring: wait for it, so release_slot comes after.
                cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            )
            self._placement = placement
            self._slot_registry = placement.registry_id
            self._audio_samples_seen = 0  # a new host counts from zero
            self._status.sidecar = placement.sidecar_id
            self._status.pool = placement.pool
            self._status.placement_reason = placement.reason
            try:
                self._enter(Phase.PREPARING)
                if workflow.patched(_PATCH_QUICK_START):
                    await self._prepare_beside_warm_up()
                else:
                    self._status.avatar = await self._prepare_avatar()
                    self._enter(Phase.WARMING_UP)
                    await self._warm_up()
                await self._open_output()
                return
            except _SidecarLost as lost:
                self._after_sidecar_loss(lost.loss)

    async def _prepare_avatar(self) -> AvatarReady:
        assert self._avatar is not None
        return await self._on_sidecar(
            ActivityName.PREPARE_AVATAR,
            PrepareAvatarInput(call=self._call(), avatar=self._avatar, fetch=self._policy.assets.fetch),
            AvatarReady,
            self._policy.activities.prepare_avatar,
        )

    async def _warm_up(self) -> EngineReady:
        return await self._on_sidecar(
            ActivityName.WARM_UP, WarmUpInput(call=self._call()), EngineReady, self._policy.activities.warm_up
        )

    async def _prepare_beside_warm_up(self) -> None:
        """Both steps at once (the sidecar orders them on its render lane); the session is warming up once its
        avatar is ready. The first failure (or a stop) cancels the other step and awaits its end, so nothing
        still runs on the sidecar when the failure moves on (to teardown or a re-placement)."""
        preparing = asyncio.create_task(self._prepare_avatar())
        warming = asyncio.create_task(self._warm_up())
        try:
            await workflow.wait_condition(lambda: preparing.done() or _failed(warming))
            if _failed(warming):
                warming.result()  # raises warm_up's failure
            self._status.avatar = preparing.result()
            self._enter(Phase.WARMING_UP)
            await warming
        except BaseException:
            for task in (preparing, warming):
                task.cancel()
            for task in (preparing, warming):
                with contextlib.suppress(asyncio.CancelledError, _SessionFailed, _SidecarLost, _Stopped):
                    await task
            raise

    async def _open_output(self) -> None:
        self._enter(Phase.OPENING_OUTPUT)
        failures = await self._open_first_of(0, live_switch=False)
        if failures is not None:
            raise _SessionFailed(
                ErrorCode.OUTPUT_UNAVAILABLE, "no output could be opened: " + "; ".join(failures)
            )

    async def _open_first_of(self, first: int, *, live_switch: bool) -> list[str] | None:
        """Try the offered outputs from position `first` of the fallback order on the current sidecar; the
        first
        that opens becomes the session's output (None). Every attempt stays visible in status; returns the
        failures when none opened.

        live_switch: the session is live and its output failed, so the sidecar swaps outputs under the
        running clock (switch_output) instead of starting one (open_output, which also starts recording)."""
        request = self._request
        failures: list[str] = []
        allow_networks = list(self._policy.outputs.rtmp_allow_networks)
        for index, spec in enumerate(self._output_specs()[first:], start=first):
            call = self._call()
            name, arg = (
                (ActivityName.SWITCH_OUTPUT, SwitchOutputInput(call, spec, request.room, allow_networks))
                if live_switch
                else (
                    ActivityName.OPEN_OUTPUT,
                    OpenOutputInput(
                        call,
                        spec,
                        request.room,
                        request.output.record,
                        allow_networks,
                        fallbacks=self._output_specs()[index + 1 :],
                        switch_back_retry_s=self._policy.outputs.switch_back_retry_s,
                    ),
                )
            )
            try:
                opened = await self._on_sidecar(name, arg, OutputOpened, self._policy.activities.open_output)
            except _SessionFailed as failure:
                # The next output in the fallback order gets its chance.
                self._status.output_attempts.append(
                    OutputAttempt(
                        kind=spec.kind,
                        sidecar_id=self._status.sidecar,
                        ok=False,
                        error=ErrorInfo(code=failure.code, message=failure.message),
                        live_switch=live_switch,
                    )
                )
                failures.append(f"{spec.kind}: {failure.message}")
                workflow.logger.warning(
                    "output failed to open",
                    extra={"output": spec.kind, "error": failure.code, "live_switch": live_switch},
                )
                continue
            self._status.output_attempts.append(
                OutputAttempt(
                    kind=spec.kind, sidecar_id=self._status.sidecar, ok=True, live_switch=live_switch
                )
            )
            self._output_index = index
            self._status.output = opened.kind
            self._status.output_detail = opened.detail
            self._upsert_search_attributes()
            return None
        return failures

    async def _serve(self) -> None:
        """Live until the session ends; a lost host is replaced per policy and the session goes on."""
        while True:
            if self._live_since is None:
                self._live_since = workflow.now()
                self._last_audio_at = self._live_since
                self._status.live_since = self._live_since.isoformat()
            if self._stop_reason is not None:
                raise _Stopped()
            self._enter(Phase.LIVE)
            try:
                result = await self._run_on_sidecar()
                if result.end_reason in _OUTPUT_FAILURE_ENDS and self._stop_reason is None:
                    self._status.stats = result.stats
                    if await self._switch_output():
                        continue  # live again, on the next output of the fallback order
            except _SidecarLost as lost:
                if self._stop_reason is not None:
                    # The host died while being stopped: the session is over either way.
                    self._status.sidecar_losses.append(lost.loss)
                    self._placement = None
                    self._status.end_reason = self._stop_reason
                    return
                self._after_sidecar_loss(lost.loss)
                await self._bring_up()
                continue
            self._status.stats = result.stats
            self._status.end_reason = result.end_reason
            if result.end_reason in _OUTPUT_FAILURE_ENDS:
                raise _SessionFailed(
                    ErrorCode.OUTPUT_FAILED, "every output failed while the session was live"
                )
            if result.end_reason is EndReason.RUNTIME_FAILED:
                raise _SessionFailed(
                    ErrorCode.RUNTIME_FAILED,
                    "the sidecar's clock or renderer for this session stopped: "
                    f"{result.detail or 'see its log'}",
                )
            return

    async def _switch_output(self) -> bool:
        """Live fallback: the output failed while live; move the session to the next output the policy
        and the request allow, on the same sidecar. False when none is left or every one failed."""
        current = self._status.output
        first = self._output_index + 1 if self._output_index is not None else len(self._output_specs())
        if first >= len(self._output_specs()):
            return False
        self._enter(Phase.OPENING_OUTPUT)
        if await self._open_first_of(first, live_switch=True) is not None:
            return False
        workflow.logger.info("output switched while live", extra={"from": current, "to": self._status.output})
        return True

    async def _run_on_sidecar(self) -> RunSessionResult:
        """Run the session on the current sidecar until it ends; reconcile with the sidecar when the run goes
        silent.

        A heartbeat timeout alone does not prove the host dead: Temporal or the workers may have been
        unreachable while the sidecar kept the session live (it does, for the policy's control-plane
        grace). So the workflow asks the sidecar, with a run_session that re-attaches to the session:
        picked up and attached -> the session carries on; refused `sidecar_session_gone` -> the sidecar
        is alive but ended the session; not picked up within `reconcile_s` -> the host is gone.
        """
        reattach = False
        while True:
            try:
                return await self._run_once(reattach=reattach)
            except _RunWentSilent as silent:
                placement = self._placement
                assert placement is not None
                workflow.logger.warning(
                    "run_session went silent; reconciling with the sidecar",
                    extra={"sidecar": placement.sidecar_id},
                )
                self._status.reconciles += 1
                # A re-attached run that goes silent again is reconciled again: each round needs the sidecar
                # to pick the call up within reconcile_s, which a dead one cannot.
                reattach = True
                self._last_silence = silent.loss

    async def _run_once(self, *, reattach: bool) -> RunSessionResult:
        """One run_session on the current sidecar, ended by the host itself or by a stop the workflow
        sends."""
        placement = self._placement
        assert placement is not None and self._live_since is not None
        limits = self._policy.session
        run_policy = self._policy.activities.run_session
        remaining_s = max(0.0, limits.max_duration_s - (workflow.now() - self._live_since).total_seconds())
        schedule_to_start_s = run_policy.reconcile_s if reattach else run_policy.schedule_to_start_s
        handle = workflow.start_activity(
            ActivityName.RUN_SESSION,
            RunSessionInput(
                call=self._call(),
                idle_timeout_s=limits.idle_timeout_s,
                max_duration_s=remaining_s,
                stats_interval_s=limits.stats_interval_s,
                stats_report_interval_s=limits.stats_report_interval_s,
                control_plane_grace_s=limits.control_plane_grace_s,
                reattach=reattach,
            ),
            result_type=RunSessionResult,
            task_queue=placement.task_queue,
            schedule_to_start_timeout=timedelta(seconds=schedule_to_start_s),
            # Generous: the workflow's own limit timers and stop come first; this only bounds a host
            # that heartbeats yet never ends.
            start_to_close_timeout=timedelta(
                seconds=remaining_s + limits.stop_grace_s + run_policy.heartbeat_timeout_s
            ),
            heartbeat_timeout=timedelta(seconds=run_policy.heartbeat_timeout_s),
            retry_policy=_SINGLE_ATTEMPT,
            cancellation_type=_SIDECAR_CANCELLATION,
            summary=f"{'reconcile: ' if reattach else ''}run_session on {placement.sidecar_id}",
        )
        stop_sent_at: datetime | None = None
        try:
            while not handle.done():
                now = workflow.now()
                if self._stop_reason is None:
                    due_reason, due_at = self._next_limit()
                    if due_at <= now:
                        workflow.logger.info("session limit reached", extra={"reason": due_reason.value})
                        self._stop_reason = due_reason
                        continue
                    wake_at = due_at
                elif stop_sent_at is None:
                    stop_sent_at = now
                    self._enter(Phase.STOPPING)
                    await self._ask_sidecar_to_stop(placement, self._stop_reason)
                    continue
                else:
                    wake_at = stop_sent_at + timedelta(seconds=limits.stop_grace_s)
                    if now >= wake_at:
                        workflow.logger.warning(
                            "sidecar did not stop within the grace period; cancelling the run"
                        )
                        handle.cancel()
                        break
                awaiting_stop = stop_sent_at is None
                with contextlib.suppress(TimeoutError):
                    await workflow.wait_condition(
                        # Wake early for the run ending, or for a stop that has not been sent yet.
                        lambda awaiting_stop=awaiting_stop: (  # type: ignore[misc]
                            handle.done() or (awaiting_stop and self._stop_reason is not None)
                        ),
                        timeout=wake_at - now,
                        timeout_summary="session limit or stop grace",
                    )
        except asyncio.CancelledError:
            await _cancel_and_wait(handle)
            raise
        try:
            return await handle
        except ActivityError as err:
            if isinstance(err.cause, ActivityCancelledError):
                return RunSessionResult(
                    end_reason=self._stop_reason or EndReason.STOPPED, stats=self._status.stats
                )
            cause = err.cause
            if isinstance(cause, ActivityTimeoutError) and cause.last_heartbeat_details:
                details = cause.last_heartbeat_details[0]
                if isinstance(details, dict):
                    self._status.stats = details
            if isinstance(cause, ActivityTimeoutError) and cause.type is TimeoutType.HEARTBEAT:
                raise _RunWentSilent(self._loss(placement, _timeout_name(cause))) from err
            if (
                reattach
                and isinstance(cause, ActivityTimeoutError)
                and cause.type is TimeoutType.SCHEDULE_TO_START
            ):
                # Silent, and no answer to the reconcile either: the host is gone. The loss names the
                # silence that started it (the heartbeat timeout), detected now.
                assert self._last_silence is not None
                unanswered = f"no answer to the reconcile within {run_policy.reconcile_s:g} s"
                raise _SidecarLost(
                    self._loss(placement, self._last_silence.timeout_type, detail=unanswered)
                ) from err
            raise self._classify(ActivityName.RUN_SESSION, err, placement) from err

    def _loss(self, placement: Placement, timeout_type: str, *, detail: str = "") -> SidecarLoss:
        return SidecarLoss(
            sidecar_id=placement.sidecar_id,
            incarnation=placement.incarnation,
            phase=self._status.phase,
            timeout_type=timeout_type,
            detected_at=workflow.now().isoformat(),
            detail=detail,
        )

    def _next_limit(self) -> tuple[EndReason, datetime]:
        assert self._live_since is not None and self._last_audio_at is not None
        limits = self._policy.session
        max_at = self._live_since + timedelta(seconds=limits.max_duration_s)
        report_interval = timedelta(seconds=limits.stats_report_interval_s)
        idle_at = self._last_audio_at + timedelta(seconds=limits.idle_timeout_s) + report_interval
        reported_at = self._status.stats_reported_at
        now = workflow.now()
        out_of_touch = max(
            timedelta(seconds=self._policy.activities.run_session.heartbeat_timeout_s), 2 * report_interval
        )
        if idle_at <= now and (not reported_at or datetime.fromisoformat(reported_at) < now - out_of_touch):
            # No report for longer than the heartbeat timeout (or two report intervals): the workflow is not
            # hearing the sidecar (the control plane was unreachable, or the run is being reconciled) and
            # cannot tell idle from unheard, so the backstop waits for a report. The sidecar enforces the
            # idle timeout itself.
            idle_at = now + report_interval
        if idle_at < max_at:
            return EndReason.IDLE_TIMEOUT, idle_at
        return EndReason.MAX_DURATION, max_at

    async def _ask_sidecar_to_stop(self, placement: Placement, reason: EndReason) -> None:
        try:
            await self._on_sidecar(
                ActivityName.STOP_SESSION,
                StopSessionInput(call=self._call(), reason=reason),
                bool,
                self._policy.activities.stop_session,
                interruptible=False,
                placement=placement,
            )
        except (_SessionFailed, _SidecarLost) as err:
            # run_session's own heartbeat timeout (dead host) or the grace period (stuck host) ends the run.
            workflow.logger.warning("stop_session failed", extra={"error": str(err)})

    def _after_sidecar_loss(self, loss: SidecarLoss) -> None:
        workflow.logger.warning(
            "sidecar lost",
            extra={"sidecar": loss.sidecar_id, "timeout": loss.timeout_type, "phase": loss.phase},
        )
        self._status.sidecar_losses.append(loss)
        session_gone = loss.timeout_type == ErrorCode.SIDECAR_SESSION_GONE
        if not session_gone:
            # A host that answered (it only dropped this session) stays a candidate for the re-placement.
            self._lost_incarnations.append(loss.incarnation)
        lost_placement = self._placement
        self._placement = None
        if lost_placement is not None:
            self._start_zombie_teardown(lost_placement)
        if self._stop_reason is not None:
            raise _Stopped()
        host_failure = self._policy.host_failure
        what = (
            f"sidecar {loss.sidecar_id} was lost ({_loss_cause(loss.timeout_type)}) while {loss.phase.value}"
        )
        if loss.detail:
            what += f" [{loss.detail}]"
        code = ErrorCode.SIDECAR_SESSION_GONE if session_gone else ErrorCode.SIDECAR_LOST
        if host_failure.on_sidecar_lost == SidecarLostAction.END:
            raise _SessionFailed(code, f"{what}; policy host_failure.on_sidecar_lost is `end`")
        if self._status.replacements >= host_failure.max_replacements:
            raise _SessionFailed(
                code,
                f"{what}; already re-placed {self._status.replacements} time(s), the policy's maximum",
            )
        self._status.replacements += 1
        self._enter(Phase.REPLACING)

    def _start_zombie_teardown(self, placement: Placement) -> None:
        """Best effort: if the 'lost' host is in fact alive (a partition), stop it publishing a ghost session.

        A restarted process under the same id ignores it: the call names the old incarnation.
        """
        policy = self._policy.activities.teardown
        self._zombie_teardowns.append(
            workflow.start_activity(
                ActivityName.TEARDOWN,
                TeardownInput(
                    call=SidecarCall(session_id=self._request.session_id, incarnation=placement.incarnation)
                ),
                result_type=bool,
                task_queue=placement.task_queue,
                start_to_close_timeout=timedelta(seconds=policy.start_to_close_s),
                schedule_to_start_timeout=timedelta(seconds=policy.schedule_to_start_s),
                heartbeat_timeout=timedelta(seconds=policy.heartbeat_timeout_s),
                retry_policy=_SINGLE_ATTEMPT,
                summary=f"teardown on lost sidecar {placement.sidecar_id}",
            )
        )

    # --- teardown -----------------------------------------------------------------------

    async def _teardown_shielded(self) -> None:
        """Run teardown to its end even if the workflow is cancelled meanwhile (a second cancel included)."""
        task = asyncio.create_task(self._teardown())
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)
        task.result()

    async def _teardown(self) -> None:
        self._status.ended_at = workflow.now().isoformat()
        self._enter(Phase.TEARING_DOWN)
        activities = self._policy.activities
        if self._placement is not None:
            try:
                await self._on_sidecar(
                    ActivityName.TEARDOWN,
                    TeardownInput(call=self._call()),
                    bool,
                    activities.teardown,
                    interruptible=False,
                )
            except (_SessionFailed, _SidecarLost) as err:
                self._status.teardown_errors.append(ErrorInfo(code=ErrorCode.SIDECAR_ERROR, message=str(err)))
        for handle in self._zombie_teardowns:
            with contextlib.suppress(ActivityError):
                await handle
        if self._may_hold_slot:
            try:
                await self._control(
                    ActivityName.RELEASE_SLOT,
                    ReleaseSlotInput(
                        session_id=self._request.session_id,
                        registry_id=self._slot_registry,
                        pools=list(self._policy.placement.pools),
                    ),
                    bool,
                    activities.release_slot,
                    interruptible=False,
                )
            except _SessionFailed as failure:
                self._status.teardown_errors.append(ErrorInfo(code=failure.code, message=failure.message))

    # --- activity plumbing --------------------------------------------------------------

    async def _control(
        self,
        name: ActivityName,
        arg: Any,
        result_type: type[ResultT],
        policy: ControlActivityPolicy,
        *,
        interruptible: bool = True,
        cancellation_type: workflow.ActivityCancellationType = workflow.ActivityCancellationType.TRY_CANCEL,
        local: bool = False,
    ) -> ResultT:
        """A control-plane step on the shared queue; `local`: run by this workflow's own worker within the
        workflow task (for short steps: no task of its own on the queue, no workflow task after it)."""
        start = workflow.start_local_activity if local else workflow.start_activity
        handle = start(
            name,
            arg,
            result_type=result_type,
            start_to_close_timeout=timedelta(seconds=policy.start_to_close_s),
            schedule_to_close_timeout=timedelta(seconds=policy.schedule_to_close_s),
            retry_policy=policy.retry.to_retry_policy(),
            cancellation_type=cancellation_type,
        )
        return await self._finish(handle, name, None, interruptible)

    async def _on_sidecar(
        self,
        name: ActivityName,
        arg: Any,
        result_type: type[ResultT],
        policy: SidecarActivityPolicy,
        *,
        interruptible: bool = True,
        placement: Placement | None = None,
    ) -> ResultT:
        target = placement or self._placement
        assert target is not None

        def start(schedule_to_start_s: float, summary: str) -> workflow.ActivityHandle[ResultT]:
            return workflow.start_activity(
                name,
                arg,
                result_type=result_type,
                task_queue=target.task_queue,
                start_to_close_timeout=timedelta(seconds=policy.start_to_close_s),
                schedule_to_start_timeout=timedelta(seconds=schedule_to_start_s),
                heartbeat_timeout=timedelta(seconds=policy.heartbeat_timeout_s),
                retry_policy=_SINGLE_ATTEMPT,
                cancellation_type=_SIDECAR_CANCELLATION,
                summary=summary,
            )

        summary = f"{name.value} on {target.sidecar_id}"
        handle = start(policy.schedule_to_start_s, summary)
        try:
            return await self._finish(handle, name, target, interruptible)
        except _SidecarLost as lost:
            # Not picked up: a dead host, or a live one whose pollers still back off after a Temporal outage
            # (up to ~10 s, more than a bring-up step's schedule_to_start_s may be). The step never started,
            # so it is scheduled once more with the allowance a reconcile gets; only a host that takes
            # neither is lost (seen in the chaos test: a drain right after an outage excluded the healthy
            # sidecar too, and every moved session failed `no_capacity`).
            if (
                name not in _ASKED_AGAIN_STEPS
                or lost.loss.timeout_type != TimeoutType.SCHEDULE_TO_START.name
                or not workflow.patched(_PATCH_ASK_AGAIN)
            ):
                raise
        again_s = self._policy.activities.run_session.reconcile_s
        workflow.logger.warning(
            "sidecar step not picked up: asking once more",
            extra={"step": name.value, "sidecar": target.sidecar_id, "schedule_to_start_s": again_s},
        )
        self._status.steps_asked_again += 1
        handle = start(again_s, f"{summary} (asked again: not picked up)")
        return await self._finish(handle, name, target, interruptible)

    async def _finish(
        self,
        handle: workflow.ActivityHandle[ResultT],
        name: ActivityName,
        placement: Placement | None,
        interruptible: bool,
    ) -> ResultT:
        try:
            if interruptible:
                await workflow.wait_condition(lambda: handle.done() or self._stop_reason is not None)
                if not handle.done():
                    await _cancel_and_wait(handle)
                    raise _Stopped()
            return await handle
        except asyncio.CancelledError:
            await _cancel_and_wait(handle)
            raise
        # An ActivityError; a local activity's failure may arrive as its cause alone.
        except FailureError as err:
            failure = self._classify(name, err, placement)
            if interruptible and isinstance(failure, _SessionFailed) and self._stop_reason is not None:
                # The step failed in the same moment a stop was accepted: the caller asked the session to
                # end, and it ends `stopped` (the step's failure is moot), never failed after a 200 stop.
                workflow.logger.info("step failed after a stop was accepted", extra={"error": failure.code})
                raise _Stopped() from err
            raise failure from err

    def _classify(self, name: ActivityName, err: FailureError, placement: Placement | None) -> Exception:
        cause = err.cause if isinstance(err, ActivityError) else err
        if placement is not None and (
            isinstance(cause, ActivityTimeoutError)
            or (isinstance(cause, ApplicationError) and cause.type in _HOST_GONE_CODES)
        ):
            if isinstance(cause, ActivityTimeoutError):
                return _SidecarLost(self._loss(placement, _timeout_name(cause)))
            return _SidecarLost(self._loss(placement, str(cause.type), detail=cause.message))
        if isinstance(cause, ApplicationError):
            return _SessionFailed(cause.type or ErrorCode.SIDECAR_ERROR, cause.message)
        if isinstance(cause, ActivityTimeoutError):
            last = cause.cause
            if isinstance(last, ApplicationError) and last.type:
                # Retries ran out of time: the last attempt's reason (e.g. no_capacity) says more than
                # "timeout".
                return _SessionFailed(
                    last.type,
                    f"{name.value} gave up after its policy's {_timeout_name(cause)}: {last.message}",
                )
            return _SessionFailed(
                ErrorCode.ACTIVITY_TIMEOUT,
                f"{name.value} did not finish within its policy ({_timeout_name(cause)})",
            )
        return _SessionFailed(ErrorCode.SIDECAR_ERROR, f"{name.value} failed: {cause or err}")

    # --- helpers ------------------------------------------------------------------------

    def _accept_stop(self, request: StopRequest) -> None:
        if self._stop_reason is None:
            self._stop_reason = EndReason.STOPPED
            self._status.stop_note = request.reason
            workflow.logger.info("stop requested", extra={"note": request.reason})

    def _call(self) -> SidecarCall:
        assert self._placement is not None
        return SidecarCall(session_id=self._request.session_id, incarnation=self._placement.incarnation)

    def _output_specs(self) -> list[OutputSpec]:
        """The request's outputs in the policy's fallback order; kinds the policy does not name are never
        tried."""
        offered = self._request.output.offered()
        return [spec for kind in self._policy.outputs.fallback_order for spec in offered if spec.kind == kind]

    def _enter(self, phase: Phase) -> None:
        self._status.phase = phase
        self._upsert_search_attributes()
        workflow.set_current_details(f"phase: {phase.value}")

    def _upsert_search_attributes(self) -> None:
        updates: list[SearchAttributeUpdate[Any]] = [
            search_attributes.ROOM.value_set(self._request.room),
            search_attributes.PHASE.value_set(self._status.phase.value),
        ]
        if self._status.output:
            updates.append(search_attributes.OUTPUT.value_set(self._status.output))
        if self._status.sidecar:
            updates.append(search_attributes.SIDECAR.value_set(self._status.sidecar))
        if self._status.pool:
            updates.append(search_attributes.POOL.value_set(self._status.pool))
        workflow.upsert_search_attributes(updates)


async def _cancel_and_wait(handle: workflow.ActivityHandle[Any]) -> None:
    handle.cancel()
    with contextlib.suppress(FailureError, asyncio.CancelledError):
        await handle


def _failed(task: asyncio.Task[Any]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is not None


def _timeout_name(error: ActivityTimeoutError) -> str:
    return error.type.name if error.type is not None else "UNKNOWN"


def _loss_cause(timeout_type: str) -> str:
    """`SidecarLoss.timeout_type` in words: a Temporal timeout type, or a host-gone error code."""
    if timeout_type == ErrorCode.SIDECAR_SHUTTING_DOWN:
        return "it shut down"
    if timeout_type == ErrorCode.SIDECAR_RESTARTED:
        return "it restarted"
    if timeout_type == ErrorCode.SIDECAR_SESSION_GONE:
        return "it no longer has the session: it ended it after losing contact with the control plane"
    return f"{timeout_type} timeout: it went silent"
