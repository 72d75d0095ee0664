"""What ingest needs from the layer above it, declared here so ingest never imports `realtime.sidecar`.

`IngestSession` is one live session's audio side (the sidecar's `SessionRuntime` satisfies it);
`AudioSessions` is the process that hosts sessions (the sidecar's `SidecarHost` satisfies it).
mypy checks both where the sidecar hands its objects to ingest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from realtime.host import SessionStats
from realtime.ingest.resample import ConvertedAudio


class PlaybackListener(Protocol):
    """Told when an utterance starts and stops playing (the WS connection, the agents bridge)."""

    def on_playback_started(self, utterance_id: int, source: str, frame_id: int) -> None: ...

    def on_playback_finished(
        self,
        utterance_id: int,
        source: str,
        position_s: float,
        interrupted: bool,
    ) -> None: ...


class IngestTimeline(Protocol):
    """The session's sample accounting, as far as an audio source touches it (16 kHz timeline samples)."""

    @property
    def generation(self) -> int:
        """Bumped by every interrupt: a source drops what its resamplers still hold when it changes."""
        ...

    @property
    def open_utterance(self) -> object | None: ...

    def check_capacity(self, incoming_samples: int) -> None:
        """Raise IngestError BUFFER_FULL when `incoming_samples` would exceed the session's buffer limit."""
        ...

    def reject(self, samples: int) -> None: ...

    def discard_held(self, samples: int) -> None:
        """Count samples an interrupt caught before they reached the timeline (received and flushed)."""
        ...


class FinishedItem(Protocol):
    @property
    def source(self) -> str: ...


class BufferLimit(Protocol):
    @property
    def buffer_limit_ms(self) -> int: ...


class IngestSession(Protocol):
    """One live session, seen from the audio sources that feed it."""

    @property
    def session_id(self) -> str: ...

    @property
    def timeline(self) -> IngestTimeline: ...

    @property
    def config(self) -> BufferLimit: ...

    @property
    def lookahead_ms(self) -> int:
        """Audio a frame needs beyond its own before it renders: the engine's, told to clients in `ready`."""
        ...

    @property
    def stopped(self) -> bool:
        """True once the session's clock is gone: audio arriving later would never play."""
        ...

    @property
    def ingest_warnings(self) -> dict[str, float]:
        """Per-source warnings shown in the session's stats (e.g. `ws_suspect_sample_rate`)."""
        ...

    def ingest(self, audio: ConvertedAudio, source: str, first_byte_at_s: float) -> None: ...

    def end_utterance(self) -> int | None: ...

    def interrupt(self) -> Sequence[FinishedItem]: ...

    def add_listener(self, listener: PlaybackListener) -> Callable[[], None]:
        """Register `listener`; the returned callable removes it."""
        ...

    def stats(self) -> SessionStats: ...


class AudioSessions(Protocol):
    """The process hosting sessions, as the audio WebSocket sees it."""

    def runtime(self, session_id: str) -> IngestSession | None:
        """The live session, or None when it is unknown or its output is not open yet."""
        ...

    async def wait_runtime(self, session_id: str, timeout_s: float) -> IngestSession | None:
        """The live session once its output is open: at once when it is, None at once for a session this
        process does not host, else after waiting up to `timeout_s` (None if it ended or never opened)."""
        ...

    def audio_client_joined(self, session_id: str) -> None: ...

    def audio_client_left(self, session_id: str) -> None: ...

    async def wait_session_end(self, session_id: str) -> None:
        """Return once the session has stopped (at once for an unknown session)."""
        ...


class ConnectionLimits(Protocol):
    """The audio WebSocket's limits (the sidecar's `ServerConfig` satisfies it)."""

    @property
    def max_message_bytes(self) -> int: ...

    @property
    def utterance_gap_ms(self) -> int: ...

    @property
    def stats_interval_ms(self) -> int: ...

    @property
    def output_open_wait_s(self) -> float:
        """How long a connection for a hosted session waits for its output to open."""
        ...
