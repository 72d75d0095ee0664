"""LiveKit access tokens minted with livekit-api: viewers subscribe only."""

from __future__ import annotations

import re
from datetime import timedelta

from livekit import api as lkapi

MAX_ROOM_CHARS = 128
ROOM_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def mint_viewer_token(api_key: str, api_secret: str, room: str, identity: str, ttl_s: int) -> str:
    grants = lkapi.VideoGrants(
        room_join=True,
        room=room,
        can_subscribe=True,
        can_publish=False,
        can_publish_data=False,
        can_update_own_metadata=False,
    )
    return (
        lkapi.AccessToken(api_key, api_secret)
        .with_identity(identity)
        .with_name(identity)
        .with_ttl(timedelta(seconds=ttl_s))
        .with_grants(grants)
        .to_jwt()
    )
