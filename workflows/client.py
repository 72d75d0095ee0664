"""Client-side helpers for the API and the CLIs: start, stop and inspect sessions (connect: workflows.temporal_client).

Not workflow code (never imported by a workflow), so it may use the Temporal client freely.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDReusePolicy

from workflows import search_attributes
from workflows.contracts import (
    CONTROL_TASK_QUEUE,
    Phase,
    SessionInput,
    SessionRequest,
    SessionResult,
    SessionStatus,
    StopRequest,
    session_workflow_id,
)
from workflows.policy import SessionPolicy
from workflows.session import SessionWorkflow

SessionHandle = WorkflowHandle[SessionWorkflow, SessionResult]


async def start_session(
    client: Client,
    request: SessionRequest,
    policy: SessionPolicy,
    *,
    task_queue: str = CONTROL_TASK_QUEUE,
    memo: Mapping[str, Any] | None = None,
    tenant: str = "",
) -> SessionHandle:
    """Start `session-<id>`; raises temporalio.exceptions.WorkflowAlreadyStartedError for a reused id (HTTP 409).

    The policy goes into the input, so this run's retries/timeouts/limits are in its history.
    `tenant` (the API caller's) becomes the LipsyncTenant search attribute: who owns the session.
    """
    attributes = [
        SearchAttributePair(search_attributes.ROOM, request.room),
        SearchAttributePair(search_attributes.PHASE, Phase.PENDING.value),
    ]
    if tenant:
        attributes.append(SearchAttributePair(search_attributes.TENANT, tenant))
    return await client.start_workflow(
        SessionWorkflow.run,
        SessionInput(request=request, policy=policy),
        id=session_workflow_id(request.session_id),
        task_queue=task_queue,
        # A session id names one session for good: a finished one is not restarted by a retrying caller.
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        memo=dict(memo) if memo else None,  # e.g. the API's traceparent and caller metadata
        search_attributes=TypedSearchAttributes(attributes),
    )


def session_handle(client: Client, session_id: str) -> SessionHandle:
    return client.get_workflow_handle_for(SessionWorkflow.run, session_workflow_id(session_id))


async def session_status(client: Client, session_id: str) -> SessionStatus:
    return await session_handle(client, session_id).query(SessionWorkflow.status)


async def stop_session(client: Client, session_id: str, reason: str = "") -> SessionStatus:
    return await session_handle(client, session_id).execute_update(SessionWorkflow.stop, StopRequest(reason=reason))
