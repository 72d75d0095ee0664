"""Client-side helpers for the API and the CLIs: start, stop and inspect sessions (connect:
workflows.temporal_client).

Not workflow code (never imported by a workflow), so it may use the Temporal client freely.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from typing import Any

from temporalio.client import Client, WorkflowHandle, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

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

logger = logging.getLogger(__name__)

SessionHandle = WorkflowHandle[SessionWorkflow, SessionResult]

# A stop is retried this many times in all (same update id: the server applies it once) over about
# STOP_RETRY_INITIAL_S * 2**attempts; the failures it rides out last a workflow task or a connection blip.
STOP_UPDATE_ATTEMPTS = 5
STOP_RETRY_INITIAL_S = 0.2
_TRANSIENT_RPC_STATUSES = frozenset(
    {
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.ABORTED,
    }
)


async def start_session(
    client: Client,
    request: SessionRequest,
    policy: SessionPolicy,
    *,
    task_queue: str = CONTROL_TASK_QUEUE,
    memo: Mapping[str, Any] | None = None,
    tenant: str = "",
) -> SessionHandle:
    """Start `session-<id>`; raises temporalio.exceptions.WorkflowAlreadyStartedError for a reused id (HTTP
    409).

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
    """Send the `stop` update, retried while it fails transiently (see is_transient_update_failure)."""
    handle = session_handle(client, session_id)
    update_id = f"stop-{uuid.uuid4().hex}"
    for attempt in range(1, STOP_UPDATE_ATTEMPTS + 1):
        try:
            return await handle.execute_update(SessionWorkflow.stop, StopRequest(reason=reason), id=update_id)
        except (RPCError, WorkflowUpdateRPCTimeoutOrCancelledError) as exc:
            if attempt == STOP_UPDATE_ATTEMPTS or not is_transient_update_failure(exc):
                raise
            logger.warning(
                "stop update failed transiently; retrying",
                extra={"session_id": session_id, "attempt": attempt, "error": str(exc)},
            )
            await asyncio.sleep(STOP_RETRY_INITIAL_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable: the last attempt returns or raises")


def is_transient_update_failure(exc: Exception) -> bool:
    """An update that did not reach the workflow but will on a retry.

    Besides connection trouble, the server rejects an update whose workflow task failed for a
    reason of its own: the usual one is a task that accepted the update and also closed the
    workflow while new events (an activity's completion) arrived, which the server answers
    with an UnhandledCommand failure and "unexpected workflow task failure" for the update.
    The next workflow task runs with those events, so the same update then lands.
    """
    if isinstance(exc, WorkflowUpdateRPCTimeoutOrCancelledError):
        return True
    if not isinstance(exc, RPCError):
        return False
    return exc.status in _TRANSIENT_RPC_STATUSES or "workflow task failure" in exc.message.lower()
