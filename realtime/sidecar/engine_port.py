"""What a session runtime needs from the engine (the port); `realtime.sidecar.engine_adapter` fills it.

The runtime thinks in session ticks: tick n shows avatar cycle position n (the avatar maps
it through its ping-pong cycle), both for idle frames and for speech frames, so the body
keeps moving continuously across speak <-> idle edges and only the mouth changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from realtime.engine.avatar.prepared import PrepareProgress
from realtime.engine.protocol import RenderHandle
from realtime.errors import LipsyncError
from realtime.host import AvatarAsset, PreparedAvatar


class AvatarView(Protocol):
    @property
    def width_px(self) -> int: ...

    @property
    def height_px(self) -> int: ...

    def idle_frame(self, tick: int) -> np.ndarray:
        """The idle-cycle frame shown at session tick `tick` (H x W x 3 uint8; do not modify it)."""
        ...


class UtteranceClosed(Exception):
    """`render_requests` of a stream the runtime closed (its utterance finished playing or was flushed): a job
    queued in the render lane before that has nothing left to render."""


class FramesOutOfOrder(LipsyncError):
    """`render_requests` for frames of a stream that later frames were already pulled past: this job's frames
    are lost (the session holds its frame), the stream and its later frames go on."""

    code = "frames_out_of_order"


class UtteranceStream(Protocol):
    """One utterance's streaming features.

    `push_audio`, `end`, `ready_frame_count` and `close` are called on the event loop and
    must be cheap; `render_requests` runs on the render lane's thread (it computes features).
    """

    def push_audio(self, samples_16k: np.ndarray) -> None:
        """Append the utterance's next 16 kHz samples (cheap: feature work happens in `render`)."""
        ...

    def end(self) -> None:
        """End of utterance: the tail is padded with silence so its last frames become ready."""
        ...

    def ready_frame_count(self) -> int:
        """Frames (from the utterance start) whose audio window, lookahead included, is complete."""
        ...

    def render_requests(self, frame_indices: list[int], ticks: list[int]) -> Sequence[Any]:
        """Engine render requests for frames `frame_indices` (in order, none skipped) on the avatar frames of
        session ticks `ticks`; `EngineService.render` turns them into images (lane thread, blocking). Raises
        `UtteranceClosed` once the stream was closed."""
        ...

    def close(self) -> None: ...


class SessionEngine(Protocol):
    """The process engine as one session sees it: its prepared avatar + a stream per utterance."""

    @property
    def avatar(self) -> AvatarView: ...

    @property
    def lookahead_ms(self) -> int:
        """Audio a frame needs beyond its own before it can be rendered (the engine's `FrameTiming`)."""
        ...

    def open_utterance(self) -> UtteranceStream: ...


@dataclass(frozen=True)
class EngineStatus:
    """The process engine as the sidecar reports it (health, warm-up): which one, where, and warm or not."""

    name: str  # its name in realtime.engine.registry
    device: str
    warm: bool
    detail: str = ""  # e.g. why the preview engine stands in for musetalk
    serving: str = ""  # the variant rendering now and any faster one being built (`ServingState.describe`)


class EngineService(Protocol):
    """The process-wide engine, as the sidecar host uses it. Every method may block: call off the loop."""

    def info(self) -> EngineStatus: ...

    def warm_up(self) -> bool:
        """Load/compile what rendering needs; returns True when it was already warm."""
        ...

    def warm_up_batch_ms(self) -> dict[int, float]:
        """Render wall time per batch size, timed by the warm-up (empty: not measured)."""
        ...

    def prepare_avatar(
        self, asset: AvatarAsset, on_progress: Callable[[PrepareProgress], None]
    ) -> tuple[PreparedAvatar, object]:
        """Prepare (or load from cache) an avatar; returns its summary and the engine's handle to it."""
        ...

    def open_session(self, avatar: object) -> SessionEngine:
        """A session's view of the engine for a prepared avatar handle."""
        ...

    def render(self, requests: Sequence[Any]) -> list[np.ndarray]:
        """Render requests from any sessions' `render_requests` in one batch (lane thread)."""
        ...

    def render_async(self, requests: Sequence[Any]) -> RenderHandle:
        """`render`, started: the handle's `result()` (lane thread, in start order) returns the frames."""
        ...

    def release_avatar(self, avatar: object) -> None:
        """The last session using this avatar ended: free what the engine holds for it (lane thread)."""
        ...
