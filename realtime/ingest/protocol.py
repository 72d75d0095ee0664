"""The audio WebSocket's text messages: parsing the client's, building the server's.

Client -> server (text, JSON objects): `config`, `end_of_utterance`, `interrupt`, `stats`.
Server -> client: `ready`, `playback_started`, `playback_finished`, `stats`, `error`.
docs/audio-protocol.md is the contract; keep the two in step.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from realtime.host import SessionStats
from realtime.ingest.errors import IngestError, IngestErrorCode
from realtime.ingest.formats import FRAME_RATE_FPS, PcmFormat
from realtime.ingest.ratewatch import RateVerdict

MAX_TEXT_MESSAGE_BYTES = 64 * 1024


@dataclass(frozen=True)
class ConfigMessage:
    pcm_format: PcmFormat


@dataclass(frozen=True)
class EndOfUtterance:
    pass


@dataclass(frozen=True)
class Interrupt:
    pass


@dataclass(frozen=True)
class StatsRequest:
    pass


ClientMessage = ConfigMessage | EndOfUtterance | Interrupt | StatsRequest

_SIMPLE: dict[str, type[EndOfUtterance | Interrupt | StatsRequest]] = {
    "end_of_utterance": EndOfUtterance,
    "interrupt": Interrupt,
    "stats": StatsRequest,
}


def parse_client_text(text: str, current: PcmFormat) -> ClientMessage:
    """Parse one text message. A config builds on `current` (keys it omits stay as they are)."""
    if len(text.encode()) > MAX_TEXT_MESSAGE_BYTES:
        raise IngestError(
            IngestErrorCode.MESSAGE_TOO_LARGE,
            f"text message of {len(text.encode())} bytes exceeds {MAX_TEXT_MESSAGE_BYTES} bytes; "
            "audio goes in binary messages",
        )
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, ValueError) as exc:
        raise IngestError(IngestErrorCode.BAD_JSON, f"text message is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise IngestError(
            IngestErrorCode.BAD_JSON, f"text message must be a JSON object, not {type(document).__name__}"
        )
    kind = document.get("type")
    if kind == "config":
        fields = {key: value for key, value in document.items() if key != "type"}
        return ConfigMessage(PcmFormat.from_mapping(fields, base=current))
    if isinstance(kind, str) and kind in _SIMPLE:
        extra = sorted(set(document) - {"type"})
        if extra:
            raise IngestError(IngestErrorCode.BAD_JSON, f"{kind} takes no fields, got {', '.join(extra)}")
        return _SIMPLE[kind]()
    raise IngestError(
        IngestErrorCode.UNKNOWN_MESSAGE_TYPE,
        f"unknown message type {kind!r}; expected one of config, end_of_utterance, interrupt, stats",
    )


def ready_message(
    session_id: str, pcm_format: PcmFormat, *, max_message_bytes: int, buffer_limit_ms: int, lookahead_ms: int
) -> dict[str, Any]:
    return {
        "type": "ready",
        "session_id": session_id,
        "format": pcm_format.as_dict(),
        "max_message_bytes": max_message_bytes,
        "buffer_limit_ms": buffer_limit_ms,
        "lookahead_ms": lookahead_ms,
        "frame_rate_fps": FRAME_RATE_FPS,
    }


def playback_started_message(utterance_id: int, frame_id: int) -> dict[str, Any]:
    """`frame_id`: the session clock frame that carries the utterance's first 40 ms (video frame metadata)."""
    return {"type": "playback_started", "utterance_id": utterance_id, "frame_id": frame_id}


def playback_finished_message(
    utterance_id: int,
    playback_position_s: float,
    interrupted: bool,
) -> dict[str, Any]:
    return {
        "type": "playback_finished",
        "utterance_id": utterance_id,
        "playback_position": round(playback_position_s, 6),
        "interrupted": interrupted,
    }


def stats_message(stats: SessionStats) -> dict[str, Any]:
    return {"type": "stats", **dataclasses.asdict(stats)}


def config_applied_message(pcm_format: PcmFormat) -> dict[str, Any]:
    return {"type": "config_applied", "format": pcm_format.as_dict()}


def suspect_sample_rate_message(verdict: RateVerdict) -> dict[str, Any]:
    """A warning (the connection stays open): a real-time stream arrives far from its declared rate."""
    return {
        "type": "warning",
        "code": "suspect_sample_rate",
        "message": (
            f"audio arrives at about {verdict.arrival_rate_hz:.0f} samples/s on a stream declared real-time "
            f"at {verdict.declared_rate_hz} Hz: if the PCM's real rate differs, declare it (sample_rate), "
            "or it plays at the wrong speed"
        ),
        "declared_sample_rate": verdict.declared_rate_hz,
        "arrival_rate_hz": round(verdict.arrival_rate_hz, 1),
    }
