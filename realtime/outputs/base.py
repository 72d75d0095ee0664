"""The publisher contract: one tick of the session clock in, media out, never stalling the clock.

A tick is 40 ms of the session: one video frame and the 1920 samples (48 kHz) of audio
that play while it is shown. Both come from the same sample-indexed timeline, so a
publisher only has to keep them together: frame N has pts N at 1/25 s, its audio starts
at sample N·1920 at 1/48 000 s. A publisher must not block `publish` on network I/O
(queue and count drops instead); the clock is the audio's and cannot wait.

To add an output kind, implement `Publisher` and declare the kind in `registry`; nothing
else in the sidecar changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

import numpy as np


class FrameKind(StrEnum):
    IDLE = "idle"
    SPEECH = "speech"
    CROSSFADE = "crossfade"  # a blend at a speak <-> idle edge


@dataclass(frozen=True)
class PublishTick:
    frame_index: int  # the session clock's frame number (pts at 1/25 s)
    deadline_s: float  # time.monotonic() at which this tick is due on the session clock
    wall_time_us: int  # Unix epoch microseconds of the deadline (the frames' user timestamp)
    frame_rgb: np.ndarray  # H x W x 3 uint8
    audio_playout: np.ndarray  # 1920 float32 samples at 48 kHz (silence when idle)
    speech_samples: int  # real speech samples (16 kHz timeline units) this tick carries; 0 when idle
    kind: FrameKind
    utterance_id: int | None = None

    @property
    def audio_start_sample(self) -> int:
        """Position of this tick's audio on the 48 kHz session clock."""
        return self.frame_index * len(self.audio_playout)


# `PublisherStats.extra` key, 1.0 while a disconnected output knows its server is gone, not just slow: a fresh
# connection to it was refused or failed. The session's failover need not wait out its output-down timeout
# (meant for a transport that may resume by itself) before moving to the next output.
SERVER_UNREACHABLE = "server_unreachable"


@dataclass
class PublisherStats:
    name: str
    connected: bool = False
    frames_published: int = 0
    frames_dropped: int = 0  # ticks that could not be delivered (disconnected, queue full)
    audio_samples_published: int = 0  # speech samples delivered, 16 kHz timeline units
    # Speech samples of dropped ticks (16 kHz units): published + dropped == rendered once playback drained.
    audio_samples_dropped: int = 0
    playout_samples_published: int = 0  # all audio delivered (speech + silence), 48 kHz samples
    reconnects: int = 0
    last_error: str = ""
    extra: dict[str, float] = field(default_factory=dict)


class Publisher(Protocol):
    @property
    def name(self) -> str: ...

    async def start(self) -> None:
        """Connect; raise (a typed OutputError) when the output cannot be opened."""
        ...

    async def publish(self, tick: PublishTick) -> None:
        """Deliver one tick. Must return within a few milliseconds (queue, never wait on the network)."""
        ...

    def interrupt(self, idle_frame: Callable[[int], np.ndarray]) -> None:
        """The session was interrupted: frames queued but not yet sent show `idle_frame(frame_index)`
        instead."""
        ...

    async def close(self) -> None:
        """Disconnect; idempotent."""
        ...

    def stats(self) -> PublisherStats: ...


@runtime_checkable
class AgentRoomPublisher(Protocol):
    """A publisher that joins a room where a voice agent may speak: the sidecar bridges that agent's
    audio into the session (realtime.ingest.agents) after each (re)connect."""

    @property
    def agent_identity(self) -> str | None:
        """The agent the avatar publishes on behalf of; None: take audio from any agent in the room."""
        ...

    def on_room(self, listener: Callable[[Any], None]) -> None: ...
