"""Admitting a LiveKit output on the sidecar worker: mint the avatar's token, refuse a taken identity.

The token is minted here, not by the API, so no secret is ever part of workflow history. The
avatar joins with its session id as a participant attribute, which tells a re-placed session's
own earlier avatar (which it may replace) from anyone else holding the identity.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from livekit import api as lkapi

from realtime.outputs.errors import OutputError
from realtime.outputs.livekit import PUBLISH_ON_BEHALF_ATTRIBUTE
from realtime.outputs.registry import AdmissionContext, LiveKitParams

logger = logging.getLogger(__name__)

SESSION_ATTRIBUTE = "lipsync.session_id"
API_KEY_ENV = "LIVEKIT_API_KEY"
API_SECRET_ENV = "LIVEKIT_API_SECRET"


class LiveKitCredentialsMissing(OutputError):
    code = "output_open_failed"


class LiveKitIdentityInUse(OutputError):
    code = "livekit_identity_in_use"


def mint_token(params: LiveKitParams, context: AdmissionContext) -> str:
    api_key = context.credentials.get(API_KEY_ENV, "")
    api_secret = context.credentials.get(API_SECRET_ENV, "")
    if not api_key or not api_secret:
        raise LiveKitCredentialsMissing(
            f"this sidecar has no LiveKit credentials ({API_KEY_ENV} / {API_SECRET_ENV})"
        )
    grants = lkapi.VideoGrants(
        room_join=True, room=context.room, can_publish=True, can_subscribe=True, can_publish_data=True
    )
    token = (
        lkapi.AccessToken(api_key, api_secret)
        .with_identity(params.identity)
        .with_name(params.identity)
        .with_kind("agent")
        .with_ttl(timedelta(seconds=context.token_ttl_s))
        .with_grants(grants)
    )
    attributes = {SESSION_ATTRIBUTE: context.session_id}
    if params.publish_on_behalf:
        attributes[PUBLISH_ON_BEHALF_ATTRIBUTE] = params.publish_on_behalf
    return token.with_attributes(attributes).to_jwt()


async def refuse_identity_collision(params: LiveKitParams, context: AdmissionContext) -> None:
    """Ask the room (LiveKit RoomService) whether the identity is taken before joining: LiveKit would kick the
    participant holding it (DUPLICATE_IDENTITY) and let the avatar publish in its place."""
    url, room, identity = params.url, context.room, params.identity
    http_url = "http" + url.removeprefix("ws") if url.startswith("ws") else url
    client = lkapi.LiveKitAPI(
        http_url,
        context.credentials.get(API_KEY_ENV, ""),
        context.credentials.get(API_SECRET_ENV, ""),
        failover=False,
    )
    try:
        response = await client.room.list_participants(lkapi.ListParticipantsRequest(room=room))
    except Exception as exc:
        # No room yet (not_found), or LiveKit unreachable / refusing these credentials: the RoomService and
        # the join are the same server and credentials, so the join cannot collide either; it fails or opens
        # an empty room, and its own error code says why.
        logger.info(
            "livekit identity check skipped",
            extra={"room": room, "session_id": context.session_id, "reason": f"{type(exc).__name__}: {exc}"},
        )
        return
    finally:
        await client.aclose()
    for participant in response.participants:
        if (
            participant.identity == identity
            and participant.attributes.get(SESSION_ATTRIBUTE) != context.session_id
        ):
            raise LiveKitIdentityInUse(
                f"identity {identity!r} is already in room {room!r} (not as this session's avatar): the "
                "avatar "
                "would kick that participant out; choose another output.livekit.identity"
            )
