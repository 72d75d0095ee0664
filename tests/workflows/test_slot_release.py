"""A slot taken by place_session is released even when the session ends while placement is in flight.

The registry's `acquire` update can succeed while the place_session activity has not yet
reported back (a loaded worker, a slow network): a stop arriving then cancels the activity.
The workflow must still release the slot, and only after that acquire has landed, or a live
sidecar keeps a slot for a session that no longer exists (its lease never expires).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from temporalio import activity
from temporalio.client import Client
from temporalio.worker import Worker

from activities.control import ControlActivities, ControlConfig
from realtime.outputs.registry import RtmpTarget
from tests.support.outputs import output_request
from tests.support.temporal_harness import Harness
from workflows.client import stop_session
from workflows.contracts import (
    ActivityName,
    EndReason,
    Placement,
    PlaceSessionInput,
)
from workflows.placement import PlacementWorkflow
from workflows.session import SessionWorkflow
from workflows.temporal_client import worker_tracing_interceptors

pytestmark = pytest.mark.service

REPLY_DELAY_S = 2.0  # how late place_session reports a placement it has already taken


class SlowReplyControlActivities(ControlActivities):
    """The production control activities, except that place_session answers late after acquiring."""

    def __init__(self, config: ControlConfig) -> None:
        super().__init__(config)
        self.acquired = asyncio.Event()

    @activity.defn(name=ActivityName.PLACE_SESSION.value)
    async def place_session(self, request: PlaceSessionInput) -> Placement:
        placement = await super().place_session(request)
        self.acquired.set()
        await asyncio.sleep(REPLY_DELAY_S)  # no heartbeat: a cancel cannot reach it, as in production
        return placement


class SlowPlacementHarness(Harness):
    control_activities: SlowReplyControlActivities

    async def _start_control_worker(self) -> None:
        config = ControlConfig(
            asset_dir=self.asset_dir,
            placement_workflow_id=self.placement_id,
            task_queue=self.control_queue,
            shards=self.shards,
        )
        self.control_activities = SlowReplyControlActivities(config)
        worker = Worker(
            self.client,
            task_queue=config.task_queue,
            workflows=[SessionWorkflow, PlacementWorkflow],
            activities=self.control_activities.definitions(),
            interceptors=worker_tracing_interceptors(self.client),
        )
        self._control_worker = await self._stack.enter_async_context(worker)


@pytest.mark.parametrize("shards", [1, 2], ids=["one-registry", "two-shards"])
async def test_stop_during_placement_releases_the_slot_taken_meanwhile(
    temporal_client: Client, tmp_path: Path, avatar_url: str, shards: int
) -> None:
    harness = SlowPlacementHarness(temporal_client, tmp_path, shards=shards)
    async with harness:
        await harness.add_sidecar("gpu0", slots=1)
        request = harness.request(avatar_url, output_request(rtmp=RtmpTarget(url="rtmp://127.0.0.1:1/x")))
        handle = await harness.start(request)
        await asyncio.wait_for(harness.control_activities.acquired.wait(), timeout=30)
        assert await harness.slots_held() == {harness.sidecar_id("gpu0"): [request.session_id]}

        await stop_session(harness.client, request.session_id, "hung up while placing")
        result = await handle.result()

        assert result.end_reason is EndReason.STOPPED and result.sidecar == ""
        assert await harness.slots_held() == {harness.sidecar_id("gpu0"): []}
        history = await handle.fetch_history()
        names = [e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events]
        assert names.count("release_slot") == 1 and "prepare_avatar" not in names
