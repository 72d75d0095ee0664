"""A placement registry on the real dev server for its own tests, and the heartbeats they send it."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

from temporalio.client import Client, WorkflowHandle
from temporalio.worker import Worker

from workflows.contracts import PlacementState, SidecarHeartbeat, sidecar_task_queue
from workflows.placement import PlacementWorkflow

RegistryHandle = WorkflowHandle[PlacementWorkflow, None]


def sidecar_beat(name: str, incarnation: str = "", *, slots: int, lease_s: float = 60.0) -> SidecarHeartbeat:
    """A simulated sidecar's registration heartbeat, every slot free (incarnation `<name>-1` by default)."""
    return SidecarHeartbeat(
        sidecar_id=name,
        incarnation=incarnation or f"{name}-1",
        task_queue=sidecar_task_queue(name),
        slots_total=slots,
        slots_free=slots,
        lease_s=lease_s,
    )


@contextlib.asynccontextmanager
async def running_registry(
    client: Client, state: PlacementState, *, name: str = "placement-test"
) -> AsyncIterator[tuple[RegistryHandle, str]]:
    """A PlacementWorkflow started with `state` on a fresh task queue served by a worker of this process;
    yields (handle, task queue) and terminates the workflow before the worker stops."""
    queue = f"{name}-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=queue, workflows=[PlacementWorkflow]):
        handle = await client.start_workflow(
            PlacementWorkflow.run, state, id=f"{name}-{uuid.uuid4().hex[:8]}", task_queue=queue
        )
        yield handle, queue
        await handle.terminate("test over")
