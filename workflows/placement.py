"""PlacementWorkflow: one registry of sidecars and their session slots, as one entity workflow.

A deployment runs one registry per (pool, shard) (`placement_registry_id`): a sidecar
registers with the shard its id hashes to in its pool, and a session's acquire goes first to
the shard its avatar hashes to, then to the pool's other shards (`activities.placement_client`).
One workflow's updates are processed one at a time, so one registry caps the placement rate;
shards multiply it. docs/scaling.md has the arithmetic.

Why a workflow and not a file or SQLite store: sidecars run on other hosts than the control
plane, so a local file cannot be their shared registry, and adding a database would add a
service to run. Every process already talks to Temporal, whose history makes this state
durable and whose updates give each `acquire` a serialised, exactly-once read-modify-write
(no lost slot under concurrent placements). Leases are durable timers: a sidecar that stops
heartbeating (killed, partitioned) drops out `lease_s` after its last heartbeat and every
slot it held is reclaimed, with no live process needed to notice (a lease that falls due while
the registry itself is down gets one more period once it is back: `_renew_after_registry_outage`).
The state is small and carried through continue-as-new, so the history stays short however long
it runs.

Protocol:
- signal `heartbeat(SidecarHeartbeat)` — register/refresh a sidecar (sent with signal-with-start,
  so the first sidecar creates this workflow);
- signal `depart(SidecarDeparture)` — graceful shutdown: drop the sidecar now;
- update `acquire(AcquireSlot) -> Placement` — take a free slot (a session holds at most one
  per registry: acquiring again releases the previous one, so retries and re-placements never
  leak); a sidecar that already prepared the request's avatar is preferred while it has room
  (cache affinity), else the one with the most free slots; fails with ApplicationError type
  `no_capacity` when none is free, `acquire_expired` past the request's `not_after_s`;
- update `release(ReleaseSlot) -> bool` — free the session's slot (True if it held one);
- signal `release_slot(ReleaseSlot)` — the same without a reply (a signal is durable once
  accepted and costs the registry less than an update);
- update `acquire_batch(AcquireBatch) -> list[AcquireOutcome]` and signal
  `release_batch(ReleaseBatch)` — many acquires or releases in one operation, each decided as
  its own `acquire` / `release_slot` would be (a refusal answers its request only). What the
  production client sends: the server's and this worker's cost is per operation, not per
  request, so a busy registry pays it once per batch (`activities.placement_client`);
- query `snapshot() -> PlacementSnapshot`.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

from workflows.contracts import (
    MAX_PLACEMENT_BATCH,
    AcquireBatch,
    AcquireOutcome,
    AcquireSlot,
    ErrorCode,
    Placement,
    PlacementReason,
    PlacementSnapshot,
    PlacementState,
    ReleaseBatch,
    ReleaseSlot,
    SidecarDeparture,
    SidecarHeartbeat,
    SidecarRecord,
)

# Runs that carry this marker arm their timer only for lease expiry (not on every event).
TIMER_ONLY_FOR_EXPIRY_PATCH = "placement-timer-only-for-expiry"
# Runs that carry this marker renew the leases that fell due while the registry itself was down
# (`_renew_after_registry_outage`); earlier runs reclaimed them.
LEASE_RENEWED_AFTER_OUTAGE_PATCH = "placement-lease-renewed-after-outage"
# Runs that carry this marker keep a lapsed sidecar's record (`_reclaim_expired`) so that the same
# process registering again gets back the slots of sessions placed on it but not yet started there.
LAPSED_RECORDS_KEPT_PATCH = "placement-lapsed-records-kept"
# How long a lapsed record is kept, in leases of its sidecar: a sidecar cut off from Temporal longer
# than its control-plane grace (ten minutes by default, ten 60 s leases) ends its sessions itself.
LAPSED_RECORD_KEPT_LEASES = 10
# Runs that carry this marker continue as new only from a workflow task that delivered no signal
# (`_may_continue_as_new`); earlier runs continued from any task.
CONTINUE_AS_NEW_WITHOUT_SIGNALS_PATCH = "placement-continue-as-new-without-signals"
# While a run is due to continue as new, it also wakes after this long: a task of its own that no signal
# came with, for a registry that only heartbeats reach (no update arrives to wake it without a signal).
CONTINUE_AS_NEW_WAKE = timedelta(milliseconds=100)
# How many workflow tasks that delivered a signal a due run lets pass before it continues as new from any
# task: the history stays bounded however busy the registry is. It decides which task continues as new:
# change it only behind a new patch marker, or runs in flight stop replaying.
MAX_CONTINUE_AS_NEW_DEFERRALS = 100
# Avatar keys remembered per sidecar for cache affinity: about what one sidecar's avatar cache holds.
AVATARS_REMEMBERED = 32


# Not sandboxed: every heartbeat, acquire and release is one activation, and the sandbox's cost per
# activation is several times the handlers' own work. Determinism rests on the module itself: it
# imports only temporalio and the contracts, and the test suite replays every history it produces.
@workflow.defn(sandboxed=False)
class PlacementWorkflow:
    @workflow.init
    def __init__(self, state: PlacementState) -> None:
        self._sidecars: dict[str, SidecarRecord] = {record.sidecar_id: record for record in state.sidecars}
        self._continue_as_new_after_events = state.continue_as_new_after_events
        self._reclaimed_sessions = state.reclaimed_sessions
        self._lapsed: dict[str, SidecarRecord] = {record.sidecar_id: record for record in state.lapsed}
        self._changed = False
        # When the lease-expiry timer now armed fires (workflow time, s); None while none is armed.
        self._armed_until_s: float | None = None
        self._rearm = False
        # History length at the start of the workflow task that last delivered a signal (-1: none yet).
        # One workflow task is one activation here, and its history length is the same in every handler and
        # in the main loop it wakes, on the first run as on replay: it names the task.
        self._signal_task_history_length = -1
        # Workflow tasks that delivered a signal since this run became due to continue as new.
        self._continue_as_new_deferrals = 0
        self._continue_as_new_without_signals = False
        # The wait now armed includes the CONTINUE_AS_NEW_WAKE wake-up.
        self._waking_to_continue = False

    @workflow.run
    async def run(self, state: PlacementState) -> None:
        if not workflow.patched(TIMER_ONLY_FOR_EXPIRY_PATCH):
            await self._run_rearming_on_every_change()  # a run that began before the patch
            return
        self._continue_as_new_without_signals = workflow.patched(CONTINUE_AS_NEW_WITHOUT_SIGNALS_PATCH)
        while True:
            self._reclaim_expired()
            if self._may_continue_as_new():
                # Handlers still running would be lost with this run; let them finish first.
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(self._state())
            self._rearm = False
            timeout = self._until_next_expiry()
            self._armed_until_s = None if timeout is None else self._now_s() + timeout.total_seconds()
            due = self._should_continue_as_new()
            self._waking_to_continue = self._continue_as_new_without_signals and due
            if self._waking_to_continue:
                # Due, and this task came with a signal: wake soon in a task of its own. The lease timer's
                # due time (`_armed_until_s`) stays what it was: this wake-up is not a lease expiry.
                timeout = CONTINUE_AS_NEW_WAKE if timeout is None else min(timeout, CONTINUE_AS_NEW_WAKE)
            # Only a lease that ends before the armed timer re-arms it: heartbeats, acquires and
            # releases (nearly every event) add no timer commands to the history. On timeout a
            # lease may be due (or was renewed meanwhile): the next turn reclaims or re-arms.
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: (
                        self._rearm
                        or self._may_continue_as_new()
                        # became due meanwhile: go round to arm the wake-up
                        or (
                            self._continue_as_new_without_signals
                            and not self._waking_to_continue
                            and self._should_continue_as_new()
                        )
                    ),
                    timeout=timeout,
                    timeout_summary="next sidecar lease expiry",
                )

    async def _run_rearming_on_every_change(self) -> None:
        """The loop of runs started before TIMER_ONLY_FOR_EXPIRY_PATCH, kept so that their histories
        replay."""
        while True:
            self._reclaim_expired()
            if self._should_continue_as_new():
                # Handlers still running would be lost with this run; let them finish first.
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(self._state())
            self._changed = False
            timeout = self._until_next_expiry()
            # On timeout a lease is due: the next turn of the loop reclaims it.
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: self._changed or self._should_continue_as_new(),
                    timeout=timeout,
                    timeout_summary="next sidecar lease expiry",
                )

    # --- handlers ---------------------------------------------------------------------

    @workflow.signal
    def heartbeat(self, beat: SidecarHeartbeat) -> None:
        self._note_signal()
        now_s = self._now_s()
        record = self._sidecars.get(beat.sidecar_id)
        if record is None or record.incarnation != beat.incarnation:
            if record is not None:
                # A new process under the same id: the old one's sessions died with it. Their
                # workflows notice (heartbeat timeout) and re-place; their slots are not carried over.
                workflow.logger.info(
                    "sidecar restarted", extra={"sidecar": beat.sidecar_id, "lost_sessions": record.sessions}
                )
                self._reclaimed_sessions += len(record.sessions)
            if self._armed_until_s is None or now_s + beat.lease_s < self._armed_until_s:
                self._rearm = True
            record = SidecarRecord(
                sidecar_id=beat.sidecar_id,
                incarnation=beat.incarnation,
                task_queue=beat.task_queue,
                slots_total=beat.slots_total,
                reported_slots_free=beat.slots_free,
                lease_expires_at_s=now_s + beat.lease_s,
                pool=beat.pool,
                lease_s=beat.lease_s,
            )
            lapsed = self._lapsed.pop(beat.sidecar_id, None)
            if lapsed is not None and lapsed.incarnation != beat.incarnation:
                lapsed = None  # a new process: the lapsed one's sessions died with it
            # The same process re-registering after its lease lapsed (it could not reach Temporal): its
            # live sessions keep their slots, and so do the sessions placed on it that it had not started
            # yet (still in its lapsed record: their workflows go on there), unless a re-placement already
            # gave them a slot elsewhere.
            returning = list(beat.sessions)
            if lapsed is not None:
                returning += [session for session in lapsed.sessions if session not in returning]
                record.avatars = list(lapsed.avatars)
            if returning:
                held = {session for other in self._sidecars.values() for session in other.sessions}
                record.sessions = [session for session in returning if session not in held]
            self._sidecars[beat.sidecar_id] = record
            workflow.logger.info(
                "sidecar registered", extra={"sidecar": beat.sidecar_id, "slots": beat.slots_total}
            )
        else:
            if self._armed_until_s is None or now_s + beat.lease_s < self._armed_until_s:
                self._rearm = True  # a lease shortened below the armed timer
            record.slots_total = beat.slots_total
            record.reported_slots_free = beat.slots_free
            record.lease_expires_at_s = now_s + beat.lease_s
            record.lease_s = beat.lease_s
            record.outage_renewed = False
            record.suspect = False
        self._changed = True

    @workflow.signal
    def depart(self, departure: SidecarDeparture) -> None:
        self._note_signal()
        lapsed = self._lapsed.get(departure.sidecar_id)
        if lapsed is not None and lapsed.incarnation == departure.incarnation:
            del self._lapsed[departure.sidecar_id]  # it drained its sessions: none will come back
        record = self._sidecars.get(departure.sidecar_id)
        if record is not None and record.incarnation == departure.incarnation:
            del self._sidecars[departure.sidecar_id]
            self._reclaimed_sessions += len(record.sessions)
            workflow.logger.info("sidecar departed", extra={"sidecar": departure.sidecar_id})
            self._changed = True

    @workflow.update
    def acquire(self, request: AcquireSlot) -> Placement:
        self._reclaim_expired()
        return self._acquire(request)

    @acquire.validator
    def _validate_acquire(self, request: AcquireSlot) -> None:
        if not request.session_id:
            raise ValueError("acquire: session_id is empty")

    @workflow.update
    def acquire_batch(self, batch: AcquireBatch) -> list[AcquireOutcome]:
        """`acquire` for each request in order, in one update: a refusal answers that request only."""
        self._reclaim_expired()
        outcomes: list[AcquireOutcome] = []
        for request in batch.requests:
            try:
                outcomes.append(AcquireOutcome(placement=self._acquire(request)))
            except ApplicationError as exc:
                outcomes.append(
                    AcquireOutcome(
                        error_type=exc.type or "",
                        error_message=exc.message,
                        non_retryable=exc.non_retryable,
                    )
                )
        return outcomes

    @acquire_batch.validator
    def _validate_acquire_batch(self, batch: AcquireBatch) -> None:
        if not 1 <= len(batch.requests) <= MAX_PLACEMENT_BATCH:
            raise ValueError(
                f"acquire_batch: {len(batch.requests)} requests (1 to {MAX_PLACEMENT_BATCH} per batch)"
            )
        if not all(request.session_id for request in batch.requests):
            raise ValueError("acquire_batch: a request's session_id is empty")

    def _acquire(self, request: AcquireSlot) -> Placement:
        if request.not_after_s and self._now_s() > request.not_after_s:
            # The caller's attempt is over; its retry has released (or will find) nothing here.
            raise ApplicationError(
                f"acquire for session {request.session_id!r} arrived after its caller gave up",
                type=ErrorCode.ACQUIRE_EXPIRED,
                non_retryable=True,
            )
        excluded = set(request.exclude_incarnations)
        self._mark_suspect(request.exclude_incarnations)
        self._release(request.session_id)
        candidates = [
            record
            for record in self._sidecars.values()
            if not record.suspect
            and record.incarnation not in excluded
            and len(record.sessions) < record.slots_total
        ]
        if not candidates:
            raise ApplicationError(
                f"no sidecar has a free slot for session {request.session_id!r} "
                f"({len(self._sidecars)} registered, {sum(len(r.sessions) for r in self._sidecars.values())} "
                "slots "
                f"in use, {len(excluded)} excluded)",
                type=ErrorCode.NO_CAPACITY,
            )
        reason = PlacementReason.MOST_FREE_SLOTS
        if request.avatar_key:
            # Cache affinity: a sidecar that prepared this avatar skips the download and preparation.
            warm = [record for record in candidates if request.avatar_key in record.avatars]
            if warm:
                candidates, reason = warm, PlacementReason.AVATAR_CACHED
        # Most free slots first spreads sessions over GPUs; the id breaks ties deterministically.
        chosen = min(candidates, key=lambda r: (-(r.slots_total - len(r.sessions)), r.sidecar_id))
        chosen.sessions.append(request.session_id)
        if request.avatar_key:
            if request.avatar_key in chosen.avatars:
                chosen.avatars.remove(request.avatar_key)
            chosen.avatars.append(request.avatar_key)
            del chosen.avatars[:-AVATARS_REMEMBERED]
        self._changed = True
        return Placement(
            sidecar_id=chosen.sidecar_id,
            incarnation=chosen.incarnation,
            task_queue=chosen.task_queue,
            registry_id=workflow.info().workflow_id,
            pool=chosen.pool,
            reason=reason.value,
        )

    @workflow.update
    def release(self, request: ReleaseSlot) -> bool:
        released = self._release(request.session_id)
        self._mark_suspect(request.suspect_incarnations)
        self._changed = True
        return released

    @workflow.signal
    def release_slot(self, request: ReleaseSlot) -> None:
        """`release` as a signal: durable once sent, cheaper, and outside the server's in-flight update
        limit."""
        self._note_signal()
        self._release(request.session_id)
        self._mark_suspect(request.suspect_incarnations)
        self._changed = True

    @workflow.signal
    def release_batch(self, batch: ReleaseBatch) -> None:
        """`release_slot` for each request, in one signal."""
        self._note_signal()
        for request in batch.requests:
            self._release(request.session_id)
            self._mark_suspect(request.suspect_incarnations)
        self._changed = True

    @workflow.query
    def snapshot(self) -> PlacementSnapshot:
        return PlacementSnapshot(
            sidecars=sorted(self._sidecars.values(), key=lambda r: r.sidecar_id),
            reclaimed_sessions=self._reclaimed_sessions,
            now_s=self._now_s(),
            lapsed=sorted(self._lapsed.values(), key=lambda r: r.sidecar_id),
        )

    # --- internals --------------------------------------------------------------------

    def _mark_suspect(self, incarnations: list[str]) -> None:
        if not incarnations:
            return
        lost = set(incarnations)
        for record in self._sidecars.values():
            if record.incarnation in lost:
                record.suspect = True

    def _release(self, session_id: str) -> bool:
        for lapsed in self._lapsed.values():
            if session_id in lapsed.sessions:
                lapsed.sessions.remove(session_id)  # ended (or re-placed) while its sidecar was cut off
        for record in self._sidecars.values():
            if session_id in record.sessions:
                record.sessions.remove(session_id)
                return True
        return False

    def _reclaim_expired(self) -> None:
        """Drop the sidecars whose lease ran out, and keep each one's record for a while.

        A lapsed lease does not prove the process dead: a sidecar cut off from Temporal (its own link
        down) keeps its live sessions and registers again, same incarnation, with the sessions it holds.
        Those that were placed on it but had not reached it yet (their workflows have a slot there and
        will start there) are in no report; the kept record gives them their slots back, so the sidecar
        is never over-booked. A release meanwhile, a re-placement, a new incarnation or
        LAPSED_RECORD_KEPT_LEASES leases of silence forgets them.
        """
        self._renew_after_registry_outage()
        now_s = self._now_s()
        for sidecar_id, record in list(self._lapsed.items()):
            if now_s - record.lease_expires_at_s > LAPSED_RECORD_KEPT_LEASES * record.lease_s:
                del self._lapsed[sidecar_id]
        for sidecar_id, record in list(self._sidecars.items()):
            if record.lease_expires_at_s <= now_s:
                del self._sidecars[sidecar_id]
                self._reclaimed_sessions += len(record.sessions)
                workflow.logger.warning(
                    "sidecar lease expired; its slots are reclaimed",
                    extra={"sidecar": sidecar_id, "sessions": list(record.sessions)},
                )
                if record.lease_s > 0 and workflow.patched(LAPSED_RECORDS_KEPT_PATCH):
                    self._lapsed[sidecar_id] = record

    def _renew_after_registry_outage(self) -> None:
        """A lease runs only while the registry can hear heartbeats.

        The registry wakes for the earliest lease expiry on a durable timer. Waking much later than that
        (by more than half the lease) means Temporal or its workers were down meanwhile: while the server
        is down it refuses every heartbeat, and when it returns its overdue timers fire at once, before a
        sidecar's client (backing off its retries) gets its next heartbeat through. Reclaiming then would
        drop every sidecar at once and leave their live sessions holding no slot until each registers
        again. So each lease due by now gets one more lease period from now: a live sidecar is heard
        again within it (its next heartbeat clears the renewal), and one that died meanwhile is reclaimed
        one lease later. A heartbeat the server accepted while only the workers were down is applied
        before this runs (signals come first in an activation), so it never needs the renewal.
        """
        if self._armed_until_s is None:
            return  # no expiry timer armed (or a run from before TIMER_ONLY_FOR_EXPIRY_PATCH)
        now_s = self._now_s()
        late_s = now_s - self._armed_until_s
        due = [
            record
            for record in self._sidecars.values()
            if record.lease_expires_at_s <= now_s
            and record.lease_s > 0
            and not record.outage_renewed
            and late_s > record.lease_s / 2
        ]
        if not due or not workflow.patched(LEASE_RENEWED_AFTER_OUTAGE_PATCH):
            return
        for record in due:
            record.lease_expires_at_s = now_s + record.lease_s
            record.outage_renewed = True
        workflow.logger.warning(
            "registry woke late for a lease expiry (Temporal or its workers were down); leases renewed",
            extra={"late_s": round(late_s, 1), "sidecars": [record.sidecar_id for record in due]},
        )

    def _until_next_expiry(self) -> timedelta | None:
        if not self._sidecars:
            return None
        next_expiry_s = min(record.lease_expires_at_s for record in self._sidecars.values())
        return timedelta(seconds=max(0.001, next_expiry_s - self._now_s()))

    def _should_continue_as_new(self) -> bool:
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= self._continue_as_new_after_events
        )

    def _note_signal(self) -> None:
        history_length = workflow.info().get_current_history_length()
        if history_length != self._signal_task_history_length and self._should_continue_as_new():
            self._continue_as_new_deferrals += 1
        self._signal_task_history_length = history_length

    def _may_continue_as_new(self) -> bool:
        """Continue as new now: the run is due, and this workflow task delivered no signal (or the run has
        deferred it MAX_CONTINUE_AS_NEW_DEFERRALS times).

        The server refuses a task that closes the run while a signal arrived during it (cause
        UnhandledCommand: the workflow must see it first; an update that arrives meanwhile moves to the
        next run instead). It fails every update that task delivered with a non-retryable "unexpected
        workflow task failure", though none of them took effect (the client sends them again), and the
        worker drops the run from its cache and replays its whole history for the next task. That replay
        takes long enough for more heartbeats to arrive, so a run that tried again from it would lose the
        race again, task after task, while every request waits. The task after a refused one always
        delivers the signal that arrived too late, so this rule lets it complete (from the replay) and
        tries again from a later task of a cached run: one replay per lost race, never a run of them.
        """
        if not self._should_continue_as_new():
            return False
        if not self._continue_as_new_without_signals:
            return True
        if workflow.info().get_current_history_length() != self._signal_task_history_length:
            return True
        return self._continue_as_new_deferrals > MAX_CONTINUE_AS_NEW_DEFERRALS

    def _state(self) -> PlacementState:
        return PlacementState(
            sidecars=list(self._sidecars.values()),
            continue_as_new_after_events=self._continue_as_new_after_events,
            reclaimed_sessions=self._reclaimed_sessions,
            lapsed=list(self._lapsed.values()),
        )

    @staticmethod
    def _now_s() -> float:
        return workflow.now().timestamp()
