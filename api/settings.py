"""API settings, from the environment (12-factor): one place that names every knob."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


class SettingsError(ValueError):
    pass


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


@dataclass(frozen=True)
class ApiSettings:
    api_keys: tuple[str, ...]
    temporal_target: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    livekit_url: str = "ws://127.0.0.1:7880"  # what clients (viewers, agents) connect to
    livekit_api_key: str = "devkey"
    livekit_api_secret: str = field(default="", repr=False)
    viewer_token_ttl_s: int = 3600
    public_base_url: str = "http://127.0.0.1:8000"

    @classmethod
    def from_env(cls) -> ApiSettings:
        keys = _split(os.environ.get("LIPSYNC_API_KEYS"))
        if not keys:
            raise SettingsError("LIPSYNC_API_KEYS is empty: set at least one API key (comma-separated)")
        secret = os.environ.get("LIVEKIT_API_SECRET", "")
        if not secret:
            raise SettingsError("LIVEKIT_API_SECRET is not set: the API mints LiveKit tokens with it")
        return cls(
            api_keys=keys,
            temporal_target=os.environ.get("TEMPORAL_ADDRESS", cls.temporal_target),
            temporal_namespace=os.environ.get("TEMPORAL_NAMESPACE", cls.temporal_namespace),
            livekit_url=os.environ.get("LIVEKIT_URL", cls.livekit_url),
            livekit_api_key=os.environ.get("LIVEKIT_API_KEY", cls.livekit_api_key),
            livekit_api_secret=secret,
            viewer_token_ttl_s=int(os.environ.get("LIPSYNC_VIEWER_TOKEN_TTL_S", cls.viewer_token_ttl_s)),
            public_base_url=os.environ.get("LIPSYNC_PUBLIC_BASE_URL", cls.public_base_url).rstrip("/"),
        )
