"""POST /v1/livekit/token: a subscribe-only viewer token for a room, plus a viewer page URL."""

from __future__ import annotations

import secrets
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from api.auth import require_api_key
from api.livekit_tokens import ROOM_NAME_PATTERN, mint_viewer_token

router = APIRouter(prefix="/v1/livekit", tags=["livekit"], dependencies=[Depends(require_api_key)])


class ViewerTokenRequest(BaseModel):
    room: str = Field(pattern=ROOM_NAME_PATTERN.pattern, description="LiveKit room name")
    identity: str | None = Field(default=None, min_length=1, max_length=128, description="viewer identity")
    ttl_s: int | None = Field(default=None, ge=60, le=86_400, description="token lifetime in seconds")


class ViewerTokenResponse(BaseModel):
    url: str
    room: str
    identity: str
    token: str
    viewer_url: str


@router.post("/token", response_model=ViewerTokenResponse)
async def viewer_token(body: ViewerTokenRequest, request: Request) -> ViewerTokenResponse:
    settings = request.app.state.settings
    identity = body.identity or f"viewer-{secrets.token_hex(4)}"
    token = mint_viewer_token(
        settings.livekit_api_key,
        settings.livekit_api_secret,
        body.room,
        identity,
        body.ttl_s or settings.viewer_token_ttl_s,
    )
    query = urlencode({"url": settings.livekit_url, "token": token})
    return ViewerTokenResponse(
        url=settings.livekit_url,
        room=body.room,
        identity=identity,
        token=token,
        viewer_url=f"{settings.public_base_url}/viewer/index.html?{query}",
    )
