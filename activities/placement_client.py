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

The control activities (`place_session`, `release_slot`), the sidecar worker's registration
and `bench.placement` all go through `Placer`, so the benchmark measures the production path.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Sequence

from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.errors import NoCapacity, to_application_error
from workflows.contracts import (
    DEFAULT_POOL,
    AcquireSlot,
    ErrorCode,
    Placement,
    PlacementState,
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


class Placer:
    """Talks to the registries of `placement_id` (`shards` per pool), workflows on `control_queue`."""

    def __init__(self, client: Client, placement_id: str, control_queue: str, *, shards: int = 1) -> None:
        self._client = client
        self.placement_id = placement_id
        self.control_queue = control_queue
        self.shards = check_shards(shards)

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
            await self._client.get_workflow_handle(registry_id).signal(PlacementWorkflow.heartbeat, beat)
            return
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
        # Signal-with-start: the first sidecar of a shard creates its registry.
        await self._client.start_workflow(
            PlacementWorkflow.run,
            PlacementState(),
            id=registry_id,
            task_queue=self.control_queue,
            start_signal="heartbeat",
            start_signal_args=[beat],
        )

    async def depart(self, sidecar_id: str, incarnation: str, pool: str = DEFAULT_POOL) -> None:
        await self._client.get_workflow_handle(self.registry_of_sidecar(sidecar_id, pool)).signal(
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
                handle = self._client.get_workflow_handle_for(PlacementWorkflow.run, registry_id)
                try:
                    return await handle.execute_update(PlacementWorkflow.acquire, request)
                except WorkflowUpdateFailedError as exc:
                    cause = exc.cause
                    if isinstance(cause, ApplicationError) and cause.type == ErrorCode.NO_CAPACITY:
                        refusals.append(f"{registry_id}: {cause.message}")
                        continue
                    if isinstance(cause, ApplicationError) and cause.type == ErrorCode.ACQUIRE_EXPIRED:
                        # This attempt is over as far as Temporal is concerned; should it still be
                        # running (clocks), a retry is what it needs, not the session's end.
                        raise ApplicationError(cause.message, type=cause.type) from exc
                    if isinstance(cause, ApplicationError) and cause.type:
                        raise ApplicationError(
                            cause.message, type=cause.type, non_retryable=cause.non_retryable
                        ) from exc
                    raise
                except RPCError as exc:
                    if exc.status == RPCStatusCode.NOT_FOUND:
                        refusals.append(f"{registry_id}: no sidecar has registered")
                        continue
                    raise
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
        results = await asyncio.gather(*(self._release_at(registry, request) for registry in targets))
        return any(results)

    async def _release_at(self, registry_id: str, request: ReleaseSlot) -> bool:
        handle = self._client.get_workflow_handle_for(PlacementWorkflow.run, registry_id)
        try:
            await handle.signal(PlacementWorkflow.release_slot, request)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return False  # no registry, so no slot to hold
            raise
        return True
