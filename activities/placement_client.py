"""Client side of placement: how sidecars register and how sessions take and give back slots.

Registries are sharded: every pool (GPU type, region) has `shards` PlacementWorkflows
(`placement_registry_id(placement_id, pool, k)`). One workflow processes its updates one at
a time, so one registry caps the fleet's placement rate; shards serve in parallel.

- A sidecar registers with shard `shard_of(sidecar_id)` of its pool and only there.
- A session's acquire tries its pools in order; within a pool it starts at the shard its
  avatar key hashes to (the same avatar lands on the same shard's sidecars, which is what
  makes cache affinity work across shards) and goes round the other shards on
  `no_capacity`, so a full shard never refuses a session that the pool has room for.
- A session holds at most one slot. Acquire releases the session's previous slot within the
  registry it lands on; a caller that may hold a slot elsewhere (a retried attempt, a
  re-placement) passes `release_first=True` and every registry of its pools is cleared
  first. Each acquire carries a deadline (`not_after_s`) past which its registry refuses it,
  so an attempt that gave up cannot land a slot after its retry cleaned up.

- Acquires and releases for one registry are batched per process (`_GroupCommit`): one
  `acquire_batch` update / `release_batch` signal in flight per registry, the requests that
  arrive meanwhile going together in the next. Each request in a batch is decided on its own.
  Idle, a request goes at once, alone; busy, the server's and the registry's per-operation cost
  is shared by the batch, so the cost per start falls as the load rises instead of the
  registry's queue growing. Heartbeats are not batched: each sidecar is its own process.
- Acquire updates retry on their own schedule (`Placer._acquirer`): while a registry closes its run
  (continue-as-new, or right after one was refused) the server refuses updates at once as "workflow is
  closing"; the Placer asks again within tens of ms, on a connection the SDK does not retry on (its
  long-poll backoff answered about a second late), and sends an unanswered attempt again under the same
  update id.

The control activities (`place_session`, `release_slot`), the sidecar worker's registration
and `bench.placement` all go through `Placer`, so the benchmark measures the production path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
import zlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Generic, TypeVar

from temporalio.api.errordetails.v1 import WorkflowNotReadyFailure
from temporalio.client import Client, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.exceptions import ApplicationError
from temporalio.service import RetryConfig, RPCError, RPCStatusCode, ServiceClient

from activities.errors import NoCapacity, to_application_error
from workflows.contracts import (
    DEFAULT_POOL,
    MAX_PLACEMENT_BATCH,
    AcquireBatch,
    AcquireOutcome,
    AcquireSlot,
    ErrorCode,
    Placement,
    PlacementState,
    ReleaseBatch,
    ReleaseSlot,
    SidecarDeparture,
    SidecarHeartbeat,
    placement_registry_id,
    sidecar_task_queue,
)
from workflows.placement import PlacementWorkflow
from workflows.policy import MAX_PLACEMENT_SHARDS, MAX_POOL_NAME_CHARS, is_pool_name

logger = logging.getLogger(__name__)


def shard_of(key: str, shards: int) -> int:
    """The shard `key` belongs to: stable across processes and releases (CRC-32, not Python's hash)."""
    return zlib.crc32(key.encode()) % shards


def check_shards(shards: int) -> int:
    if not 1 <= shards <= MAX_PLACEMENT_SHARDS:
        raise ValueError(f"placement shards must be between 1 and {MAX_PLACEMENT_SHARDS} (got {shards})")
    return shards


def check_pool(pool: str) -> str:
    if not is_pool_name(pool):
        raise ValueError(
            f"pool {pool!r} must be 1-{MAX_POOL_NAME_CHARS} characters of letters, digits, '-', '_' or '.'"
        )
    return pool


# Longest one batched operation may take: a place_session or release_slot attempt (start-to-close 10 s by
# policy) is over by then, and the requests queued behind it go on.
OPERATION_TIMEOUT_S = 10.0

# An acquire batch the server aborted with its registry's refused workflow task
# (`aborted_with_refused_workflow_task`) is sent again after this pause times the attempt (at most
# ABORTED_UPDATE_MAX_PAUSE_S), for as long as the operation's OPERATION_TIMEOUT_S allows: the registry's next
# workflow task is already scheduled, and a registry that loses several races in a row (one that
# continues as new from any task) must not fail a request that was never applied.
ABORTED_UPDATE_PAUSE_S = 0.05
ABORTED_UPDATE_MAX_PAUSE_S = 0.5


def aborted_with_refused_workflow_task(exc: RPCError) -> bool:
    """The server aborted an update because it refused the workflow task that delivered it.

    The server refuses a workflow task's completion when, for example, the task closes the run (continue-
    as-new) while new events arrived during it (cause UnhandledCommand). It then aborts each update that
    task delivered with WorkflowNotReady, "unexpected workflow task failure", without recording anything
    of it: the update never took effect, and the same request may be sent again.
    """
    return exc.status == RPCStatusCode.FAILED_PRECONDITION and any(
        detail.Is(WorkflowNotReadyFailure.DESCRIPTOR) for detail in exc.grpc_status.details
    )


# How long one attempt of an acquire update's RPC may wait before it is sent again under the same update id
# (within the operation's OPERATION_TIMEOUT_S). The server deduplicates the id within a run, so a resend of
# an update still pending there only joins it; one the server has set aside (the run was closing) is
# admitted afresh. Above an answered acquire's usual latency on a busy registry, so resends stay rare.
UPDATE_RPC_TIMEOUT_S = 0.25
# Pause before sending an acquire update again after a retryable refusal (UPDATE_RETRYABLE), growing by
# half at each attempt up to UPDATE_RETRY_MAX_PAUSE_S. Right after a registry's workflow task is refused,
# and while its run continues as new, the server refuses every update at once with "workflow operation can
# not be applied because workflow is closing" (UNAVAILABLE) for the few hundred ms the registry needs; the
# SDK's own retry of it (long-poll backoff) reached the registry about a second later. These pauses reach it
# within UPDATE_RETRY_MAX_PAUSE_S of being ready; a server that is down costs one small RPC per pause per
# registry with a request in flight, until OPERATION_TIMEOUT_S.
UPDATE_RETRY_PAUSE_S = 0.02
UPDATE_RETRY_MAX_PAUSE_S = 0.2
UPDATE_RETRYABLE = frozenset(
    {
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.ABORTED,
        RPCStatusCode.UNKNOWN,
    }
)
# The acquire updates' own connection leaves retries to the loop in Placer._acquirer (the pauses above): at
# most one immediate retry in the SDK (a max_retries of 0 would mean no limit).
NO_RPC_RETRY = RetryConfig(
    initial_interval_millis=1,
    randomization_factor=0.0,
    multiplier=1.0,
    max_interval_millis=1,
    max_elapsed_time_millis=1,
    max_retries=1,
)


def rpc_timed_out(exc: WorkflowUpdateRPCTimeoutOrCancelledError) -> bool:
    """The update's RPC ran out of its own deadline (the SDK reports it as an RPC error, deadline exceeded or
    cancelled), as opposed to this caller's task being cancelled (an asyncio.CancelledError)."""
    cause = exc.__cause__
    return isinstance(cause, RPCError) and cause.status in (
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.CANCELLED,
    )


async def connect_for_updates(client: Client) -> Client:
    """A client like `client` (namespace, converter, interceptors) on its own connection, whose RPCs are
    not retried by the SDK (NO_RPC_RETRY): every other call keeps the client's retries."""
    service = await ServiceClient.connect(
        dataclasses.replace(client.service_client.config, retry_config=NO_RPC_RETRY)
    )
    options = client.config()
    options["service_client"] = service
    return Client(**options)


Request = TypeVar("Request")
Answer = TypeVar("Answer")


class _GroupCommit(Generic[Request, Answer]):
    """Sends the requests for one registry in batches, with at most one batch in flight
    (`max_batch` 1: no batching, every request sent at once on its own, as before batching).

    A request that finds nothing in flight goes at once, alone (no added latency when idle); the
    ones that arrive while a batch is in flight wait for it and go together in the next. So the
    batch size follows the load: the server's and the registry's cost is per operation, and a busy
    registry pays it once per batch instead of once per request.
    """

    def __init__(
        self,
        send: Callable[[list[Request]], Awaitable[list[Answer]]],
        max_batch: int,
        timeout_s: float = OPERATION_TIMEOUT_S,
    ) -> None:
        self._send = send
        self._max_batch = max_batch
        self._timeout_s = timeout_s
        self._waiting: list[tuple[Request, asyncio.Future[Answer]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.batches_sent = 0
        self.requests_sent = 0

    async def submit(self, request: Request) -> Answer:
        if self._max_batch == 1:
            # Batching off: every request is its own operation, sent at once (none waits for another).
            self.batches_sent += 1
            self.requests_sent += 1
            (answer,) = await self._send([request])
            return answer
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        flusher = self._flusher
        if flusher is None or flusher.done() or flusher.get_loop() is not asyncio.get_running_loop():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def wait_idle(self) -> None:
        """Return once nothing is queued or in flight (each operation ends within its timeout)."""
        while (flusher := self._flusher) is not None and not flusher.done():
            await asyncio.gather(flusher, return_exceptions=True)

    async def _flush(self) -> None:
        while self._waiting:
            # A caller that gave up before its request left (cancelled, timed out) sends nothing.
            self._waiting = [(request, future) for request, future in self._waiting if not future.done()]
            batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
            if not batch:
                return
            self.batches_sent += 1
            self.requests_sent += len(batch)
            try:
                # Bounded: an operation that never returns (a registry whose workflow tasks fail) must not
                # hold back the requests queued behind it.
                answers = await asyncio.wait_for(
                    self._send([request for request, _ in batch]), self._timeout_s
                )
            except Exception as exc:  # the whole operation failed: every request in it gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            except BaseException:  # this task cancelled (loop shutting down): so are its callers
                for _, future in batch + self._waiting:
                    future.cancel()
                self._waiting = []
                raise
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)


class Placer:
    """Talks to the registries of `placement_id` (`shards` per pool), workflows on `control_queue`.

    Keep one Placer per process (per Temporal client): concurrent acquires and releases for the same
    registry share its batches.
    """

    def __init__(
        self,
        client: Client,
        placement_id: str,
        control_queue: str,
        *,
        shards: int = 1,
        max_batch: int = MAX_PLACEMENT_BATCH,
    ) -> None:
        self.client = client
        self.placement_id = placement_id
        self.control_queue = control_queue
        self.shards = check_shards(shards)
        if not 1 <= max_batch <= MAX_PLACEMENT_BATCH:
            raise ValueError(f"max_batch must be between 1 and {MAX_PLACEMENT_BATCH} (got {max_batch})")
        self._max_batch = max_batch
        self._acquirers: dict[str, _GroupCommit[AcquireSlot, AcquireOutcome]] = {}
        self._releasers: dict[str, _GroupCommit[ReleaseSlot, bool]] = {}
        # Acquire updates sent again under the same id after UPDATE_RPC_TIMEOUT_S without an answer.
        self.update_rpc_resends = 0
        # Acquire updates sent again after a retryable refusal (UPDATE_RETRYABLE).
        self.update_retries = 0
        # The connection acquire updates go through (connect_for_updates), made on first use per event loop.
        self._connecting: asyncio.Future[Client] | None = None

    def batching(self) -> dict[str, int]:
        """Operations sent and requests they carried so far (requests / operations = mean batch size)."""
        acquirers, releasers = self._acquirers.values(), self._releasers.values()
        return {
            "acquire_updates": sum(group.batches_sent for group in acquirers),
            "acquire_requests": sum(group.requests_sent for group in acquirers),
            "release_signals": sum(group.batches_sent for group in releasers),
            "release_requests": sum(group.requests_sent for group in releasers),
            "update_rpc_resends": self.update_rpc_resends,
            "update_retries": self.update_retries,
        }

    async def wait_idle(self) -> None:
        """Return once no batched request of this Placer is queued or in flight (before closing its loop)."""
        await asyncio.gather(
            *(group.wait_idle() for group in self._acquirers.values()),
            *(group.wait_idle() for group in self._releasers.values()),
        )

    async def _client_for_updates(self) -> Client:
        connecting = self._connecting
        if (
            connecting is None
            or connecting.get_loop() is not asyncio.get_running_loop()
            or (connecting.done() and (connecting.cancelled() or connecting.exception() is not None))
        ):
            # One connection for all the registries' acquires; a failed attempt is made again next time.
            connecting = self._connecting = asyncio.ensure_future(connect_for_updates(self.client))
        return await asyncio.shield(connecting)

    def _acquirer(self, registry_id: str) -> _GroupCommit[AcquireSlot, AcquireOutcome]:
        group = self._acquirers.get(registry_id)
        if group is None:

            async def send(requests: list[AcquireSlot]) -> list[AcquireOutcome]:
                handle = (await self._client_for_updates()).get_workflow_handle_for(
                    PlacementWorkflow.run, registry_id
                )
                loop = asyncio.get_running_loop()
                deadline = loop.time() + OPERATION_TIMEOUT_S
                aborted = retried = 0
                update_id = uuid.uuid4().hex
                while True:
                    try:
                        return await handle.execute_update(
                            PlacementWorkflow.acquire_batch,
                            AcquireBatch(requests),
                            id=update_id,
                            rpc_timeout=timedelta(seconds=UPDATE_RPC_TIMEOUT_S),
                        )
                    except WorkflowUpdateRPCTimeoutOrCancelledError as exc:
                        if not rpc_timed_out(exc) or loop.time() >= deadline:
                            raise  # cancelled (this caller gave up), or the operation's bound is spent
                        self.update_rpc_resends += 1
                        continue  # not answered yet: ask again at once, same id
                    except RPCError as exc:
                        if aborted_with_refused_workflow_task(exc):
                            aborted += 1
                            pause_s = min(ABORTED_UPDATE_PAUSE_S * aborted, ABORTED_UPDATE_MAX_PAUSE_S)
                            logger.info(
                                "acquire batch aborted with a refused registry workflow task; sent again",
                                extra={
                                    "registry": registry_id,
                                    "requests": len(requests),
                                    "attempt": aborted,
                                },
                            )
                            # The server keeps the aborted id as aborted: the resend is a new update.
                            update_id = uuid.uuid4().hex
                        elif exc.status in UPDATE_RETRYABLE:
                            pause_s = min(UPDATE_RETRY_PAUSE_S * 1.5**retried, UPDATE_RETRY_MAX_PAUSE_S)
                            retried += 1
                            self.update_retries += 1
                        else:
                            raise
                        if loop.time() + pause_s >= deadline:
                            raise
                    await asyncio.sleep(pause_s)

            group = self._acquirers[registry_id] = _GroupCommit(send, self._max_batch)
        return group

    def _releaser(self, registry_id: str) -> _GroupCommit[ReleaseSlot, bool]:
        group = self._releasers.get(registry_id)
        if group is None:
            handle = self.client.get_workflow_handle_for(PlacementWorkflow.run, registry_id)

            async def send(requests: list[ReleaseSlot]) -> list[bool]:
                try:
                    await handle.signal(PlacementWorkflow.release_batch, ReleaseBatch(requests))
                except RPCError as exc:
                    if exc.status == RPCStatusCode.NOT_FOUND:
                        return [False] * len(requests)  # no registry, so no slot to hold
                    raise
                return [True] * len(requests)

            group = self._releasers[registry_id] = _GroupCommit(send, self._max_batch)
        return group

    def registry_of_sidecar(self, sidecar_id: str, pool: str) -> str:
        return placement_registry_id(self.placement_id, pool, shard_of(sidecar_id, self.shards))

    def registries(self, pool: str, key: str) -> list[str]:
        """The pool's registries in the order an acquire for `key` tries them: its home shard first."""
        home = shard_of(key, self.shards)
        return [
            placement_registry_id(self.placement_id, pool, (home + k) % self.shards)
            for k in range(self.shards)
        ]

    # --- sidecars ---------------------------------------------------------------------------

    async def heartbeat(
        self,
        sidecar_id: str,
        incarnation: str,
        slots_total: int,
        lease_s: float,
        *,
        slots_free: int | None = None,
        pool: str = DEFAULT_POOL,
    ) -> None:
        await self.send_heartbeat(
            SidecarHeartbeat(
                sidecar_id=sidecar_id,
                incarnation=incarnation,
                task_queue=sidecar_task_queue(sidecar_id),
                slots_total=slots_total,
                slots_free=slots_total if slots_free is None else slots_free,
                lease_s=lease_s,
                pool=pool,
            )
        )

    async def send_heartbeat(self, beat: SidecarHeartbeat) -> None:
        registry_id = self.registry_of_sidecar(beat.sidecar_id, beat.pool)
        try:
            # A plain signal while the registry runs (nearly always) costs the server less than
            # signal-with-start.
            await self.client.get_workflow_handle(registry_id).signal(PlacementWorkflow.heartbeat, beat)
            return
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
        # Signal-with-start: the first sidecar of a shard creates its registry.
        await self.client.start_workflow(
            PlacementWorkflow.run,
            PlacementState(),
            id=registry_id,
            task_queue=self.control_queue,
            start_signal="heartbeat",
            start_signal_args=[beat],
        )

    async def depart(self, sidecar_id: str, incarnation: str, pool: str = DEFAULT_POOL) -> None:
        await self.client.get_workflow_handle(self.registry_of_sidecar(sidecar_id, pool)).signal(
            PlacementWorkflow.depart, SidecarDeparture(sidecar_id=sidecar_id, incarnation=incarnation)
        )

    # --- sessions ---------------------------------------------------------------------------

    async def acquire(
        self,
        session_id: str,
        avatar_key: str = "",
        exclude_incarnations: Sequence[str] = (),
        *,
        pools: Sequence[str] = (DEFAULT_POOL,),
        release_first: bool = False,
        deadline_s: float = 0.0,
    ) -> Placement:
        """A slot for `session_id`: ApplicationError `no_capacity` (retryable) when no registry has one.

        deadline_s: seconds since the epoch past which a registry refuses this acquire (0: none).
        """
        if not pools:
            raise ValueError("acquire: no pool given")
        if release_first:
            await self.release(session_id, pools=pools, suspect_incarnations=exclude_incarnations)
        request = AcquireSlot(
            session_id=session_id,
            exclude_incarnations=list(exclude_incarnations),
            avatar_key=avatar_key,
            not_after_s=deadline_s,
        )
        refusals: list[str] = []
        for pool in pools:
            for registry_id in self.registries(pool, avatar_key or session_id):
                try:
                    outcome = await self._acquirer(registry_id).submit(request)
                except RPCError as exc:
                    if exc.status == RPCStatusCode.NOT_FOUND:
                        refusals.append(f"{registry_id}: no sidecar has registered")
                        continue
                    raise
                if outcome.placement is not None:
                    return outcome.placement
                if outcome.error_type == ErrorCode.NO_CAPACITY:
                    refusals.append(f"{registry_id}: {outcome.error_message}")
                    continue
                if outcome.error_type == ErrorCode.ACQUIRE_EXPIRED:
                    # This attempt is over as far as Temporal is concerned; should it still be
                    # running (clocks), a retry is what it needs, not the session's end.
                    raise ApplicationError(outcome.error_message, type=outcome.error_type)
                raise ApplicationError(
                    outcome.error_message or f"acquire refused by {registry_id}",
                    type=outcome.error_type or None,
                    non_retryable=outcome.non_retryable,
                )
        asked = "; ".join(refusals[:4]) + ("; ..." if len(refusals) > 4 else "")
        raise to_application_error(
            NoCapacity(
                f"no sidecar has a free slot for session {session_id!r} in pools {list(pools)} "
                f"({len(refusals)} registries asked): {asked}"
            )
        )

    async def release(
        self,
        session_id: str,
        registry_id: str = "",
        *,
        pools: Sequence[str] = (DEFAULT_POOL,),
        suspect_incarnations: Sequence[str] = (),
    ) -> bool:
        """Free the session's slot (a signal: the registry applies it right after, in history order).

        Without `registry_id`, every registry of `pools` is told, and each marks `suspect_incarnations`
        suspect. True when a registry that exists took it.
        """
        targets = (
            [registry_id] if registry_id else [r for pool in pools for r in self.registries(pool, session_id)]
        )
        request = ReleaseSlot(session_id=session_id, suspect_incarnations=list(suspect_incarnations))
        results = await asyncio.gather(*(self._releaser(registry).submit(request) for registry in targets))
        return any(results)
