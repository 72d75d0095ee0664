"""Request and response bodies of the session API (OpenAPI is generated from these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.livekit_tokens import ROOM_NAME_PATTERN

SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
IDENTITY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"
MAX_URL_CHARS = 2048
MAX_METADATA_KEYS = 32
MAX_METADATA_VALUE_CHARS = 512
MAX_SESSION_SECONDS = 24 * 3600.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AvatarIn(_Strict):
    frames_zip_url: str | None = Field(
        default=None,
        max_length=MAX_URL_CHARS,
        description="http(s) URL of a zip of face frames (PNG/JPEG, same size, natural-sorted names)",
    )
    idle_video_url: str | None = Field(
        default=None, max_length=MAX_URL_CHARS, description="http(s) URL of a short idle video of the face"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> AvatarIn:
        if (self.frames_zip_url is None) == (self.idle_video_url is None):
            raise ValueError("give exactly one of frames_zip_url or idle_video_url")
        return self


class LiveKitOutputIn(_Strict):
    room: str = Field(pattern=ROOM_NAME_PATTERN.pattern, description="the LiveKit room to publish into")
    identity: str | None = Field(
        default=None,
        pattern=IDENTITY_PATTERN,
        description="the avatar's identity (default avatar-<session id>)",
    )
    publish_audio: bool = Field(
        default=True, description="publish the speech too (off when the caller publishes it: lips then lag)"
    )
    publish_on_behalf: str | None = Field(
        default=None, pattern=IDENTITY_PATTERN, description="the agent identity the avatar stands in for"
    )


class RtmpOutputIn(_Strict):
    url: str = Field(
        pattern=r"^rtmps?://", max_length=MAX_URL_CHARS, description="rtmp(s)://host[:port]/app/stream-key"
    )


class OutputIn(_Strict):
    livekit: LiveKitOutputIn | None = None
    rtmp: RtmpOutputIn | None = Field(default=None, description="fallback (or only) output")
    record: bool = Field(default=False, description="also record an MP4 on the sidecar")

    @model_validator(mode="after")
    def _some_output(self) -> OutputIn:
        if self.livekit is None and self.rtmp is None:
            raise ValueError("give livekit, rtmp or both")
        return self


class AudioIn(_Strict):
    sample_rate: int = Field(default=16_000, ge=8_000, le=192_000, description="Hz")
    encoding: Literal["s16le", "f32le"] = "s16le"
    channels: int = Field(default=1, ge=1, le=8)


class CreateSessionIn(_Strict):
    session_id: str | None = Field(
        default=None, pattern=SESSION_ID_PATTERN, description="your id for the session (default: generated)"
    )
    avatar: AvatarIn
    output: OutputIn
    audio: AudioIn | None = Field(
        default=None,
        description="the PCM you will send (default s16le mono 16 kHz)",
    )
    idle_timeout_s: float | None = Field(default=None, gt=0, le=MAX_SESSION_SECONDS)
    max_duration_s: float | None = Field(default=None, gt=0, le=MAX_SESSION_SECONDS)
    metadata: dict[str, str] | None = Field(
        default=None,
        description="stored with the session (workflow memo)",
    )

    @model_validator(mode="after")
    def _metadata_bounds(self) -> CreateSessionIn:
        if self.metadata is not None:
            if len(self.metadata) > MAX_METADATA_KEYS:
                raise ValueError(f"metadata: at most {MAX_METADATA_KEYS} keys")
            if any(
                len(key) > 128 or len(value) > MAX_METADATA_VALUE_CHARS
                for key, value in self.metadata.items()
            ):
                raise ValueError(
                    f"metadata: keys up to 128 and values up to {MAX_METADATA_VALUE_CHARS} characters",
                )
        return self


class LiveKitInfo(BaseModel):
    url: str
    room: str
    identity: str


class SessionCreated(BaseModel):
    session_id: str
    audio_ws_url: str
    livekit: LiveKitInfo | None
    status_url: str
    trace_id: str | None = None
    temporal_ui_url: str


class ErrorOut(BaseModel):
    code: str
    message: str


class SessionOut(BaseModel):
    session_id: str
    room: str
    phase: str
    audio_ws_url: str = Field(
        default="",
        description="the session's audio WebSocket with a fresh audio token",
    )
    workflow_status: str = Field(description="Temporal execution status: RUNNING, COMPLETED, FAILED, ...")
    output: str = ""
    output_detail: str = ""
    sidecar: str = ""
    pool: str = Field(default="", description="the sidecar pool the session was placed in")
    placement_reason: str = Field(
        default="",
        description="why that sidecar: avatar_cached (it had the avatar prepared) or most_free_slots",
    )
    stats: dict[str, Any] = Field(default_factory=dict)
    stats_reported_at: str = ""
    error: ErrorOut | None = None
    end_reason: str | None = None
    live_since: str = ""
    ended_at: str = ""
    output_attempts: list[dict[str, Any]] = Field(default_factory=list)
    replacements: int = 0
    sidecar_losses: list[dict[str, Any]] = Field(default_factory=list)
    reconciles: int = Field(
        default=0,
        description="times the session's sidecar went silent (e.g. a control-plane outage) and the workflow "
        "re-attached to it, the session going on",
    )
    steps_asked_again: int = Field(
        default=0,
        description="start-up steps the sidecar did not pick up in time and that were scheduled once more "
        "before it would count as lost (its pollers back off after a control-plane outage)",
    )
    trace_id: str | None = None
    temporal_ui_url: str = ""


class SessionSummary(BaseModel):
    session_id: str
    room: str
    phase: str
    output: str
    sidecar: str
    workflow_status: str
    start_time: str
    close_time: str | None


class SessionList(BaseModel):
    sessions: list[SessionSummary]
    next_page_token: str | None = None


class StopIn(_Strict):
    reason: str = Field(default="", max_length=512)


class SeedStartIn(_Strict):
    """The seed orchestrator's body for POST /session/start."""

    room: str = Field(pattern=ROOM_NAME_PATTERN.pattern)
    frames_zip_url: str | None = Field(default=None, max_length=MAX_URL_CHARS)
    idle_video_url: str | None = Field(default=None, max_length=MAX_URL_CHARS)
    connect_livekit: bool = True
    rtmp_url: str | None = Field(default=None, pattern=r"^rtmps?://", max_length=MAX_URL_CHARS)
    session_id: str | None = Field(default=None, pattern=SESSION_ID_PATTERN)
    record: bool = False
