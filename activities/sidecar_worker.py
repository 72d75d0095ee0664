"""The Temporal side of a sidecar process: its own-queue worker plus its placement registration.

`lipsync sidecar` (infra/cli/sidecar.py) runs it inside the sidecar process as one of
`realtime.sidecar.process.serve()`'s services (`sidecar_worker_service`), with the options
`infra.cli.sidecar.add_temporal_arguments` adds to its command line. The service connects a client and calls:

    await run_sidecar_worker(client, host, SidecarWorkerConfig.for_host(host, asset_dir), shutdown=event)

(`lipsync sidecar --no-temporal` is the sidecar without it.)

That polls the host's task queue (`sidecar-<id>` by convention) for the sidecar activities,
registers the host's capacity with its pool's placement registry (the shard its id hashes
to: activities.placement_client) and refreshes that lease every
`registration_interval_s` until `shutdown` is set (or the service is cancelled: SIGTERM);
then it tells placement it left and drains the worker, whose cut-short steps report
`sidecar_shutting_down` so their sessions move on at once. A process killed outright simply
stops heartbeating: placement reclaims its slots once the lease lapses, and the sessions it
served see run_session's heartbeat timeout and are re-placed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker

from activities.placement_client import Placer, check_pool, check_shards
from activities.sidecar import SidecarActivities, SidecarWorkerConfig
from realtime.host import SessionHost
from workflows.contracts import (
    CONTROL_TASK_QUEUE,
    DEFAULT_POOL,
    PLACEMENT_WORKFLOW_ID,
    SidecarHeartbeat,
)
from workflows.temporal_client import connect_client, worker_tracing_interceptors

logger = logging.getLogger(__name__)

# Sessions have at most two activities in flight each (run_session and one short step, or prepare_avatar
# and warm_up while starting); leave room for teardowns.
ACTIVITIES_PER_SLOT = 3
# A stopping sidecar's run_session never ends by itself: after this grace its activities are
# cancelled and report `sidecar_shutting_down`, so their sessions move to another sidecar at
# once instead of waiting out a heartbeat timeout. Short steps (a teardown) finish within it.
GRACEFUL_SHUTDOWN_S = 2.0
DEFAULT_LEASE_S = 15.0
DEFAULT_REGISTRATION_INTERVAL_S = 5.0


async def run_sidecar_worker(
    client: Client,
    host: SessionHost,
    config: SidecarWorkerConfig,
    *,
    shutdown: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Serve this sidecar's task queue until `shutdown` is set (forever if None); `ready` is set once
    registered."""
    capacity = host.capacity()
    if capacity.task_queue and capacity.task_queue != config.queue:
        raise ValueError(
            f"host reports task queue {capacity.task_queue!r} but the worker config says {config.queue!r}: "
            "build the config with SidecarWorkerConfig.for_host(host, ...)"
        )
    check_pool(config.pool)
    placer = Placer(
        client,
        config.placement_workflow_id,
        config.control_task_queue,
        shards=check_shards(config.placement_shards),
    )
    incarnation = uuid.uuid4().hex
    activities = SidecarActivities(host, config, incarnation)
    worker = Worker(
        client,
        task_queue=config.queue,
        activities=activities.definitions(),
        interceptors=worker_tracing_interceptors(client),
        max_concurrent_activities=max(4, capacity.slots_total * ACTIVITIES_PER_SLOT + 2),
        graceful_shutdown_timeout=timedelta(seconds=GRACEFUL_SHUTDOWN_S),
    )
    stop = shutdown or asyncio.Event()
    logger.info(
        "sidecar worker starting",
        extra={
            "sidecar": config.sidecar_id,
            "queue": config.queue,
            "incarnation": incarnation,
            "pool": config.pool,
            "registry": placer.registry_of_sidecar(config.sidecar_id, config.pool),
        },
    )
    # Register only once the queue is polled (the worker entered first), so no placement points at a queue
    # nobody serves; leave placement before the worker drains.
    async with worker, placement_registration(placer, host, config, incarnation, activities.sessions_held):
        if ready is not None:
            ready.set()
        await stop.wait()
    logger.info("sidecar worker stopped", extra={"sidecar": config.sidecar_id})


@contextlib.asynccontextmanager
async def placement_registration(
    placer: Placer, host: SessionHost, config: SidecarWorkerConfig, incarnation: str, sessions: set[str]
) -> AsyncIterator[None]:
    """Registered with placement while inside: one registration on entry, renewed every
    `registration_interval_s`, and on exit the renewals stop and placement is told this incarnation left."""
    await _register(placer, host, config, incarnation, sessions)
    renewals = asyncio.create_task(_keep_registered(placer, host, config, incarnation, sessions))
    try:
        yield
    finally:
        renewals.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewals
        with contextlib.suppress(Exception):
            await placer.depart(config.sidecar_id, incarnation, config.pool)


async def _register(
    placer: Placer, host: SessionHost, config: SidecarWorkerConfig, incarnation: str, sessions: set[str]
) -> None:
    """One registration heartbeat: this incarnation's queue, free slots and the sessions it holds."""
    capacity = host.capacity()
    beat = SidecarHeartbeat(
        sidecar_id=config.sidecar_id,
        incarnation=incarnation,
        task_queue=config.queue,
        slots_total=capacity.slots_total,
        slots_free=capacity.slots_free,
        lease_s=config.lease_s,
        pool=config.pool,
        sessions=sorted(sessions),
    )
    await placer.send_heartbeat(beat)


def heartbeat_send_timeout_s(config: SidecarWorkerConfig) -> float:
    """How long one registration heartbeat may take before it is abandoned for the next one.

    While Temporal is unreachable the client retries a call with a back-off that grows to seconds between
    attempts (about ten seconds in all), so an unbounded heartbeat sent during an outage reaches placement
    only at its next attempt, seconds after Temporal is back. The registry renews a lease that fell due
    during its own outage for one lease period only, so a fresh heartbeat must go out about every
    registration interval once Temporal returns: each one is bounded by the interval, and by a third of
    the lease where that is longer (a loaded host's slow round trip is not cut short).
    """
    return max(config.registration_interval_s, config.lease_s / 3)


async def _keep_registered(
    placer: Placer, host: SessionHost, config: SidecarWorkerConfig, incarnation: str, sessions: set[str]
) -> None:
    """Renew the registration every `registration_interval_s` until cancelled (a failed one is logged)."""
    send_timeout_s = heartbeat_send_timeout_s(config)
    while True:
        await asyncio.sleep(config.registration_interval_s)
        try:
            await asyncio.wait_for(_register(placer, host, config, incarnation, sessions), send_timeout_s)
        except Exception as exc:  # Temporal briefly unreachable: the lease covers a few missed beats
            logger.warning(
                "placement heartbeat failed",
                extra={"sidecar": config.sidecar_id, "error": str(exc) or type(exc).__name__},
            )


# --- `lipsync sidecar` wiring -----------------------------------------------------------------


@dataclass(frozen=True)
class SidecarTemporalOptions:
    """Where a sidecar process finds Temporal and its placement registry (from its command line)."""

    address: str
    namespace: str
    asset_dir: Path
    control_task_queue: str = CONTROL_TASK_QUEUE
    placement_workflow_id: str = PLACEMENT_WORKFLOW_ID
    placement_shards: int = 1
    pool: str = DEFAULT_POOL
    lease_s: float = DEFAULT_LEASE_S
    registration_interval_s: float = DEFAULT_REGISTRATION_INTERVAL_S
    recordings_dir: Path | None = None

    def worker_config(self, host: SessionHost) -> SidecarWorkerConfig:
        return SidecarWorkerConfig.for_host(
            host,
            self.asset_dir,
            recordings_dir=self.recordings_dir,
            control_task_queue=self.control_task_queue,
            placement_workflow_id=self.placement_workflow_id,
            placement_shards=self.placement_shards,
            pool=self.pool,
            lease_s=self.lease_s,
            registration_interval_s=self.registration_interval_s,
        )


def sidecar_worker_service(
    options: SidecarTemporalOptions,
) -> Callable[[SessionHost], Coroutine[Any, Any, None]]:
    """A `realtime.sidecar.process.serve()` service: connect (traced client) and serve the host's queue.

    It runs until the process stops (serve() cancels it, which departs placement and drains the
    worker); if it fails — Temporal unreachable at start — serve() stops the whole sidecar.
    """

    async def service(host: SessionHost) -> None:
        client = await connect_client(options.address, options.namespace)
        await run_sidecar_worker(client, host, options.worker_config(host))

    return service
