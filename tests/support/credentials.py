"""The sidecar secret of a test run: generated once per run and put in the environment, so every sidecar
process a test spawns (which inherits it) and every in-process sidecar and API share it."""

from __future__ import annotations

import os
import secrets
import time

from realtime.sidecar.auth import SECRET_ENV, mint_audio_token

SIDECAR_SECRET = os.environ.setdefault(SECRET_ENV, secrets.token_hex(32))
AUDIO_TOKEN_TTL_S = 600


def service_headers() -> dict[str, str]:
    """The service credential, as the API's relay and health reads send it."""
    return {"Authorization": f"Bearer {SIDECAR_SECRET}"}


def audio_token(session_id: str, ttl_s: int = AUDIO_TOKEN_TTL_S) -> str:
    return mint_audio_token(SIDECAR_SECRET, session_id, int(time.time()) + ttl_s)
