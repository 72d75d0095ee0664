"""`LipsyncClient`: the HTTP API (sessions, stop, interrupt, viewer tokens) over one httpx connection pool."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from lipsync_client.audio import AudioStream
from lipsync_client.errors import ApiError, ApiUnreachableError, SessionFailedError, WaitTimeoutError
from lipsync_client.models import (
    TERMINAL_PHASES,
    AudioFormat,
    Avatar,
    LiveKitOutput,
    SessionCreated,
    SessionPage,
    SessionStatus,
    SessionSummary,
    ViewerToken,
)

logger = logging.getLogger("lipsync_client")

DEFAULT_TIMEOUT_S = 30.0
STATUS_POLL_INTERVAL_S = 0.25


class LipsyncClient:
    """Async client of a lipsync-live API.

    Use as `async with LipsyncClient(url, key) as client:` (or call `aclose()`). Every error
    status raises `ApiError` with the server's `code`; a network failure raises
    `ApiUnreachableError`.
    """

    def __init__(
        self,
        api_url: str,
        api_key: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        if not api_url.startswith(("http://", "https://")):
            raise ValueError(f"api_url must be an http(s) URL, got {api_url!r}")
        if not api_key:
            raise ValueError("api_key is empty: pass the key the API was started with (LIPSYNC_API_KEYS)")
        self.api_url = api_url.rstrip("/")
        self.api_key = api_key
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(base_url=self.api_url, timeout=timeout_s, trust_env=False)

    async def __aenter__(self) -> LipsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    # --- sessions -------------------------------------------------------------------------

    async def create_session(
        self,
        *,
        avatar: Avatar,
        livekit: LiveKitOutput | None = None,
        rtmp_url: str | None = None,
        record: bool = False,
        audio: AudioFormat | None = None,
        session_id: str | None = None,
        idle_timeout_s: float | None = None,
        max_duration_s: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> SessionCreated:
        """Start a session (`POST /v1/sessions`). It is not live yet: see `wait_until_live`."""
        if livekit is None and rtmp_url is None:
            raise ValueError("create_session: give livekit, rtmp_url or both")
        output: dict[str, Any] = {"record": record}
        if livekit is not None:
            output["livekit"] = livekit.to_json()
        if rtmp_url is not None:
            output["rtmp"] = {"url": rtmp_url}
        body: dict[str, Any] = {"avatar": avatar.to_json(), "output": output}
        optional: dict[str, Any] = {
            "session_id": session_id,
            "audio": audio.to_json() if audio is not None else None,
            "idle_timeout_s": idle_timeout_s,
            "max_duration_s": max_duration_s,
            "metadata": metadata,
        }
        body.update({key: value for key, value in optional.items() if value is not None})
        created = SessionCreated.from_json(await self._request("POST", "/v1/sessions", json=body))
        logger.info("session started", extra={"session_id": created.session_id, "trace_id": created.trace_id})
        return created

    async def get_session(self, session_id: str) -> SessionStatus:
        return SessionStatus.from_json(await self._request("GET", f"/v1/sessions/{_segment(session_id)}"))

    async def list_sessions(
        self,
        *,
        room: str | None = None,
        phase: str | None = None,
        page_size: int | None = None,
        page_token: str | None = None,
    ) -> SessionPage:
        params = {"room": room, "phase": phase, "page_size": page_size, "page_token": page_token}
        body = await self._request(
            "GET", "/v1/sessions", params={k: v for k, v in params.items() if v is not None}
        )
        return SessionPage(
            sessions=[SessionSummary.from_json(entry) for entry in body.get("sessions", [])],
            next_page_token=body.get("next_page_token"),
        )

    async def stop_session(self, session_id: str, reason: str = "") -> SessionStatus:
        """Stop the session (idempotent); answers its status once the stop was accepted."""
        body = await self._request(
            "POST", f"/v1/sessions/{_segment(session_id)}/stop", json={"reason": reason}
        )
        return SessionStatus.from_json(body)

    async def interrupt(self, session_id: str) -> None:
        """Barge-in through the API. Needs this session's audio to flow through the API's relay
        (409 `no_audio_connection` otherwise); an `AudioStream` can also interrupt on its own socket."""
        await self._request("POST", f"/v1/sessions/{_segment(session_id)}/interrupt")

    async def viewer_token(
        self, room: str, *, identity: str | None = None, ttl_s: int | None = None
    ) -> ViewerToken:
        """Mint a subscribe-only LiveKit token for `room` (`POST /v1/livekit/token`)."""
        body: dict[str, Any] = {"room": room}
        if identity is not None:
            body["identity"] = identity
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        return ViewerToken.from_json(await self._request("POST", "/v1/livekit/token", json=body))

    async def wait_for_phase(
        self,
        session_id: str,
        phases: Iterable[str],
        *,
        timeout_s: float,
        poll_interval_s: float = STATUS_POLL_INTERVAL_S,
    ) -> SessionStatus:
        """Poll until the session's phase is one of `phases`; `WaitTimeoutError` past `timeout_s`.

        A session that reaches a terminal phase that is not wanted raises `SessionFailedError`
        (with the session's error code), since it will never get there.
        """
        wanted = set(phases)
        deadline = time.monotonic() + timeout_s
        while True:
            status = await self.get_session(session_id)
            if status.phase in wanted:
                return status
            if status.phase in TERMINAL_PHASES:
                error = status.error
                raise SessionFailedError(
                    session_id,
                    status.phase,
                    error.code if error else (status.end_reason or ""),
                    error.message if error else f"it ended ({status.end_reason or 'no reason given'})",
                )
            if time.monotonic() >= deadline:
                raise WaitTimeoutError(
                    f"session {session_id} is still {status.phase!r} after {timeout_s:.0f} s "
                    f"(waited for {', '.join(sorted(wanted))})"
                )
            await asyncio.sleep(poll_interval_s)

    async def wait_until_live(self, session_id: str, *, timeout_s: float = 120.0) -> SessionStatus:
        return await self.wait_for_phase(session_id, {"live"}, timeout_s=timeout_s)

    async def health(self) -> dict[str, Any]:
        """`GET /health`: readiness, its checks, and each sidecar's engine (no key needed)."""
        return await self._request("GET", "/health")

    # --- audio ----------------------------------------------------------------------------

    def audio_ws_url(self, session_id: str) -> str:
        """The API's audio WebSocket for a session whose start response you no longer have.

        Prefer `SessionCreated.audio_ws_url`: the server may put more into it (a format, a token).
        """
        parts = urlsplit(self.api_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urlunsplit(
            (scheme, parts.netloc, f"{parts.path}/v1/sessions/{_segment(session_id)}/audio", "", "")
        )

    def audio_stream(
        self, target: SessionCreated | str, *, audio_format: AudioFormat | None = None
    ) -> AudioStream:
        """An `AudioStream` on the session's audio WebSocket (`async with client.audio_stream(created) as
        audio:`).

        `target` is the start response (its `audio_ws_url` is used as given) or an
        `audio_ws_url`. `audio_format`, when given, is declared with a `config` message on connect.
        """
        url = target.audio_ws_url if isinstance(target, SessionCreated) else target
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"audio_ws_url must be a ws(s):// URL, got {url!r}")
        return AudioStream(url, api_key=self.api_key, audio_format=audio_format)

    # --- internals ------------------------------------------------------------------------

    async def _request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        try:
            response = await self._http.request(
                method, path, json=json, params=params, headers={"X-API-Key": self.api_key}
            )
        except httpx.HTTPError as exc:
            raise ApiUnreachableError(f"{method} {self.api_url}{path}: {type(exc).__name__}: {exc}") from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            if isinstance(body, dict) and "code" in body:
                raise ApiError(response.status_code, str(body["code"]), str(body.get("message", "")), body)
            raise ApiError(
                response.status_code, "http_error", response.text[:500] or response.reason_phrase, body
            )
        if not isinstance(body, dict):
            raise ApiError(
                response.status_code, "bad_response", f"{method} {path}: expected a JSON object", body
            )
        return body


def _segment(value: str) -> str:
    """A path segment: ids are validated server-side, but a `/` must never change the route."""
    if not value:
        raise ValueError("session_id is empty")
    return quote(value, safe="")
