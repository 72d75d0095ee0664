"""POST /v1/livekit/token: a subscribe-only viewer token for the room of one of the caller's sessions.

Tokens are minted only for a room where a session of the caller's tenant is running (an admin: any
tenant's), with an identity in the `viewer-` namespace (an avatar identity may not start with it, so a
viewer never takes over the avatar's or an agent's place in the room) and a lifetime capped by
`LIPSYNC_VIEWER_TOKEN_MAX_TTL_S`.
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from temporalio.client import Client

from api.auth import Principal, require_api_key
from api.deps import services
from api.errors import ApiError
from api.livekit_tokens import ROOM_NAME_PATTERN, mint_viewer_token
from api.sessions import VIEWER_IDENTITY_PREFIX, namespaced_room
from workflows import search_attributes
from workflows.session import SessionWorkflow

router = APIRouter(prefix="/v1/livekit", tags=["livekit"])


class ViewerTokenRequest(BaseModel):
    room: str = Field(
        pattern=ROOM_NAME_PATTERN.pattern,
        description="the room of one of your running sessions",
    )
    identity: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description=f"viewer identity (prefixed {VIEWER_IDENTITY_PREFIX!r} when it lacks it)",
    )
    ttl_s: int | None = Field(default=None, ge=60, le=86_400, description="token lifetime in seconds")


class ViewerTokenResponse(BaseModel):
    url: str
    room: str
    identity: str
    token: str
    viewer_url: str


async def _has_running_session(client: Client, room: str, principal: Principal) -> bool:
    clauses = [
        f"WorkflowType = '{SessionWorkflow.__name__}'",
        "ExecutionStatus = 'Running'",
        f"{search_attributes.ROOM.name} = {json.dumps(room)}",
    ]
    if not principal.admin:
        clauses.append(f"{search_attributes.TENANT.name} = {json.dumps(principal.tenant)}")
    async for _ in client.list_workflows(" AND ".join(clauses), limit=1):
        return True
    return False


@router.post("/token", response_model=ViewerTokenResponse)
async def viewer_token(
    body: ViewerTokenRequest,
    request: Request,
    principal: Annotated[Principal, Depends(require_api_key)],
) -> ViewerTokenResponse:
    settings = services(request).settings
    ttl_s = body.ttl_s or settings.viewer_token_ttl_s
    if ttl_s > settings.viewer_token_max_ttl_s:
        raise ApiError(
            "ttl_too_long",
            f"ttl_s {ttl_s} exceeds this deployment's cap of {settings.viewer_token_max_ttl_s} s",
        )
    room = namespaced_room(principal, body.room, settings.tenants)
    client = await services(request).temporal.client()  # here, not as a dependency: a bad body is a 422 first
    if not await _has_running_session(client, room, principal):
        raise ApiError("no_session_in_room", f"none of your sessions is running in room {room!r}")
    identity = body.identity or secrets.token_hex(4)
    if not identity.startswith(VIEWER_IDENTITY_PREFIX):
        identity = VIEWER_IDENTITY_PREFIX + identity
    token = mint_viewer_token(settings.livekit_api_key, settings.livekit_api_secret, room, identity, ttl_s)
    query = urlencode({"url": settings.livekit_url, "token": token})
    return ViewerTokenResponse(
        url=settings.livekit_url,
        room=room,
        identity=identity,
        token=token,
        viewer_url=f"{settings.public_base_url}/viewer/index.html?{query}",
    )
