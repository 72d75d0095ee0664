"""Typed views of the API's JSON bodies.

Each view keeps the whole body in `raw`, so a field the server adds later is readable before
this client learns its name. Parsing is lenient about extra keys and strict about the ones it
names: a body without `session_id` is not a session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# Phases after which a session never changes again.
TERMINAL_PHASES = frozenset({"completed", "failed", "cancelled"})


class ResponseShapeError(ValueError):
    """The server answered JSON that lacks a field this client needs (a version mismatch)."""


def _require(body: dict[str, Any], key: str, what: str) -> Any:
    if key not in body:
        raise ResponseShapeError(f"{what}: the response has no {key!r} field: {body!r}")
    return body[key]


@dataclass(frozen=True)
class Avatar:
    """The face: exactly one of a zip of frames or a short idle video, both http(s) URLs."""

    frames_zip_url: str | None = None
    idle_video_url: str | None = None

    def __post_init__(self) -> None:
        if (self.frames_zip_url is None) == (self.idle_video_url is None):
            raise ValueError("Avatar: give exactly one of frames_zip_url or idle_video_url")

    def to_json(self) -> dict[str, str]:
        if self.frames_zip_url is not None:
            return {"frames_zip_url": self.frames_zip_url}
        assert self.idle_video_url is not None
        return {"idle_video_url": self.idle_video_url}


@dataclass(frozen=True)
class LiveKitOutput:
    """Publish into a LiveKit room. `identity` defaults to the server's choice (read it from the start
    response)."""

    room: str
    identity: str | None = None
    publish_audio: bool = True
    publish_on_behalf: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"room": self.room, "publish_audio": self.publish_audio}
        if self.identity is not None:
            body["identity"] = self.identity
        if self.publish_on_behalf is not None:
            body["publish_on_behalf"] = self.publish_on_behalf
        return body


@dataclass(frozen=True)
class AudioFormat:
    """The PCM a client will send: the server resamples anything in range to its own timeline."""

    sample_rate_hz: int = 16_000
    encoding: Literal["s16le", "f32le"] = "s16le"
    channels: int = 1

    @property
    def bytes_per_sample_frame(self) -> int:
        return (2 if self.encoding == "s16le" else 4) * self.channels

    def to_json(self) -> dict[str, Any]:
        return {"sample_rate": self.sample_rate_hz, "encoding": self.encoding, "channels": self.channels}


@dataclass(frozen=True)
class LiveKitInfo:
    url: str
    room: str
    identity: str


@dataclass(frozen=True)
class SessionCreated:
    """The 201 of `POST /v1/sessions`. Use `audio_ws_url` and `livekit.identity` exactly as given."""

    session_id: str
    audio_ws_url: str
    status_url: str
    livekit: LiveKitInfo | None
    trace_id: str | None
    temporal_ui_url: str
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SessionCreated:
        what = "POST /v1/sessions"
        livekit = body.get("livekit")
        return cls(
            session_id=str(_require(body, "session_id", what)),
            audio_ws_url=str(_require(body, "audio_ws_url", what)),
            status_url=str(body.get("status_url", "")),
            livekit=LiveKitInfo(
                url=str(livekit["url"]), room=str(livekit["room"]), identity=str(livekit["identity"])
            )
            if isinstance(livekit, dict)
            else None,
            trace_id=body.get("trace_id"),
            temporal_ui_url=str(body.get("temporal_ui_url", "")),
            raw=body,
        )


@dataclass(frozen=True)
class SessionError:
    code: str
    message: str


@dataclass(frozen=True)
class SessionStatus:
    """A session's state (`GET /v1/sessions/{id}`, and the body `stop` answers with)."""

    session_id: str
    phase: str
    output: str
    sidecar: str
    end_reason: str | None
    error: SessionError | None
    stats: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)

    @property
    def is_terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SessionStatus:
        what = "session status"
        error = body.get("error")
        return cls(
            session_id=str(_require(body, "session_id", what)),
            phase=str(_require(body, "phase", what)),
            output=str(body.get("output") or ""),
            sidecar=str(body.get("sidecar") or ""),
            end_reason=body.get("end_reason"),
            error=SessionError(code=str(error.get("code", "")), message=str(error.get("message", "")))
            if isinstance(error, dict)
            else None,
            stats=dict(body.get("stats") or {}),
            raw=body,
        )


@dataclass(frozen=True)
class SessionSummary:
    session_id: str
    room: str
    phase: str
    output: str
    sidecar: str
    workflow_status: str
    start_time: str
    close_time: str | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SessionSummary:
        return cls(
            session_id=str(_require(body, "session_id", "session list entry")),
            room=str(body.get("room", "")),
            phase=str(body.get("phase", "")),
            output=str(body.get("output", "")),
            sidecar=str(body.get("sidecar", "")),
            workflow_status=str(body.get("workflow_status", "")),
            start_time=str(body.get("start_time", "")),
            close_time=body.get("close_time"),
        )


@dataclass(frozen=True)
class SessionPage:
    sessions: list[SessionSummary]
    next_page_token: str | None


@dataclass(frozen=True)
class ViewerToken:
    """A subscribe-only LiveKit token for a room and the bundled viewer page's URL."""

    url: str
    room: str
    identity: str
    token: str
    viewer_url: str

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ViewerToken:
        what = "POST /v1/livekit/token"
        return cls(
            url=str(_require(body, "url", what)),
            room=str(_require(body, "room", what)),
            identity=str(_require(body, "identity", what)),
            token=str(_require(body, "token", what)),
            viewer_url=str(body.get("viewer_url", "")),
        )
