"""The sidecar's control surface: what the Temporal activities on a sidecar's task queue call.

`activities/` (the sidecar-side activities) depends on this protocol; `realtime/sidecar`
implements it. Data here is plain dataclasses so activities can translate them to and from
the workflow contracts without importing anything heavy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

# The engine reports preparation progress; the control surface re-exports its type.
from realtime.engine.avatar.prepared import PrepareProgress


class SessionEndReason(StrEnum):
    STOPPED = "stopped"  # stop signal / API stop
    IDLE_TIMEOUT = "idle_timeout"  # no audio for the policy's idle timeout
    MAX_DURATION = "max_duration"  # the session ran for its maximum duration
    CLIENT_GONE = "client_gone"  # the audio client (WS or agent) left and did not return
    OUTPUT_FAILED = "output_failed"  # every output in the fallback order failed while live
    RUNTIME_FAILED = "runtime_failed"  # the session's clock or render task died (a defect): no frames flow


@dataclass(frozen=True)
class AvatarAsset:
    """A fetched and validated avatar on the sidecar's disk."""

    path: Path  # frames zip or idle video
    kind: str  # "frames_zip" | "idle_video"
    digest_sha256: str


@dataclass(frozen=True)
class PreparedAvatar:
    """Result of avatar preparation, cached on disk by digest + engine version."""

    digest_sha256: str
    cache_dir: Path
    frame_count: int
    width_px: int
    height_px: int
    cache_hit: bool


@dataclass(frozen=True)
class WarmUpResult:
    engine: str  # its name in realtime.engine.registry
    device: str
    warm_up_ms: float
    already_warm: bool


@dataclass(frozen=True)
class OutputTarget:
    """An admitted output: a kind registered in `realtime.outputs.registry` and that kind's target."""

    kind: str
    target: object  # the kind's target_type (e.g. LiveKitTarget); its publisher factory is built from it
    record_path: Path | None = None  # optional MP4 recording beside the live output


@dataclass(frozen=True)
class OpenedOutput:
    kind: str
    detail: str  # what status shows: a room name or a URL without credentials


@dataclass
class SessionStats:
    """Counters a running session reports (heartbeat details, /debug/audio, metrics).

    Sample accounting holds at all times (16 kHz timeline samples):
        received == rendered + pending + rejected + flushed
    (flushed: queued audio an interrupt discarded; 0 for a session never interrupted).
    Once playback has drained, published == rendered for an output that publishes audio.
    """

    session_id: str
    output: str = ""  # the session's publishers by name, the live output first (e.g. "livekit,recording")
    output_detail: str = ""  # the live output's room or URL (no credentials), as OpenedOutput.detail
    frames_published: int = 0
    speech_frames: int = 0
    idle_frames: int = 0
    dropped_frames: int = 0
    audio_samples_received: int = 0
    audio_samples_rendered: int = 0
    audio_samples_pending: int = 0
    audio_samples_published: int = 0
    audio_samples_rejected: int = 0
    audio_samples_flushed: int = 0
    ttff_ms: float | None = None
    lateness_ms_p99: float | None = None
    av_offset_ms: float | None = None
    fallbacks: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunLimits:
    idle_timeout_s: float
    max_duration_s: float
    stats_interval_s: float = 2.0


@dataclass(frozen=True)
class SessionEnd:
    reason: SessionEndReason
    stats: SessionStats
    detail: str = ""  # for runtime_failed: which task died, and with what


@dataclass(frozen=True)
class Capacity:
    sidecar_id: str
    task_queue: str
    slots_total: int
    slots_free: int


class SessionHost(Protocol):
    """One sidecar process: one engine shared by all its sessions."""

    def capacity(self) -> Capacity: ...

    async def prepare_avatar(
        self, session_id: str, asset: AvatarAsset, on_progress: Callable[[PrepareProgress], None]
    ) -> PreparedAvatar: ...

    async def warm_up(self) -> WarmUpResult: ...

    async def open_output(
        self,
        session_id: str,
        target: OutputTarget,
        fallbacks: Sequence[OutputTarget] = (),
        switch_back_retry_s: float = 0.0,
    ) -> OpenedOutput:
        """Connect the session's output; raises on failure (the workflow applies the fallback policy).

        While live, the host fails over to `fallbacks` (admitted, in order) on its own when the output dies,
        and with `switch_back_retry_s` > 0 returns to `target` once it opens again; the stats it reports
        (`output`, `fallbacks`) say where the session is."""
        ...

    async def switch_output(self, session_id: str, target: OutputTarget) -> OpenedOutput:
        """Move a live session to another output (the next of its fallback order) without restarting it.

        Raises on failure, leaving the session on its current output. After a run that ended
        `output_failed`, a successful switch makes the session runnable again: the next
        run_session serves it on the new output (the workflow's live fallback).
        """
        ...

    async def run_session(
        self, session_id: str, limits: RunLimits, on_stats: Callable[[SessionStats], None]
    ) -> SessionEnd:
        """Serve the session until stop, idle timeout, max duration or client gone; calls on_stats
        periodically."""
        ...

    async def stop_session(self, session_id: str, reason: SessionEndReason) -> None: ...

    async def teardown(self, session_id: str) -> None:
        """Close the session's outputs (live and recording), release the slot. Idempotent."""
        ...
