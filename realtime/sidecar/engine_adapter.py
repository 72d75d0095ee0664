"""The sidecar's port onto `realtime.engine`: one engine per process, a stream per utterance.

The engine is synchronous and single-threaded; everything that touches it (preparation,
warm-up, feature pulls, rendering) runs on the render lane's thread. The event loop only
appends audio to an utterance's inbox; the inbox is moved into the engine's feature stream
on the lane thread, right before that utterance's frames are pulled.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from realtime.engine.audio.stream import AudioFeatureStream, FeatureFrame
from realtime.engine.avatar.prepared import Avatar, PrepareProgress
from realtime.engine.errors import EngineError
from realtime.engine.protocol import Engine, EngineConfig, FrameTiming, RenderHandle, RenderRequest
from realtime.engine.registry import create_engine
from realtime.host import AvatarAsset, PreparedAvatar
from realtime.ingest.formats import FRAME_RATE_FPS, TIMELINE_SAMPLE_RATE_HZ
from realtime.sidecar.engine_port import (
    AvatarView,
    EngineStatus,
    FramesOutOfOrder,
    SessionEngine,
    UtteranceClosed,
    UtteranceStream,
)

logger = logging.getLogger(__name__)


class EngineTimingUnsupported(EngineError):
    """The engine's frame rate or sample rate is not the sidecar's session timeline's."""

    code = "engine_timing_unsupported"


def check_timing(timing: FrameTiming) -> None:
    """The session timeline (ticks, audio/video sync, publishers) runs at one frame and sample rate."""
    if timing.fps != FRAME_RATE_FPS or timing.sample_rate_hz != TIMELINE_SAMPLE_RATE_HZ:
        raise EngineTimingUnsupported(
            f"the engine renders {timing.fps} fps from {timing.sample_rate_hz} Hz audio; the sidecar's "
            f"session timeline is {FRAME_RATE_FPS} fps at {TIMELINE_SAMPLE_RATE_HZ} Hz"
        )


class _AvatarView:
    def __init__(self, avatar: Avatar) -> None:
        self._avatar = avatar

    @property
    def width_px(self) -> int:
        return self._avatar.width_px

    @property
    def height_px(self) -> int:
        return self._avatar.height_px

    def idle_frame(self, tick: int) -> np.ndarray:
        return self._avatar.idle_frame(tick)


class _Utterance:
    """An utterance's audio inbox (loop thread) in front of the engine's feature stream (lane thread)."""

    def __init__(self, engine: Engine, avatar: Avatar) -> None:
        self._engine = engine
        self._avatar = avatar
        self._timing = engine.timing
        self._stream = engine.open_stream()
        self._lock = threading.Lock()
        self._inbox: list[np.ndarray] = []
        self._samples = 0
        self._ended = False
        self._end_applied = False
        self._closed = False
        self._next_frame = 0  # the next frame a job asks for
        self._pulled: list[FeatureFrame] = []  # frames from _next_frame on, pulled ahead for this lane batch

    def push_audio(self, samples_16k: np.ndarray) -> None:
        if samples_16k.size == 0:
            return
        with self._lock:
            self._inbox.append(np.ascontiguousarray(samples_16k, dtype=np.float32))
            self._samples += len(samples_16k)

    def end(self) -> None:
        with self._lock:
            self._ended = True

    def ready_frame_count(self) -> int:
        with self._lock:
            return self._timing.ready_frames(self._samples, ended=self._ended)

    def apply_inbox(self) -> AudioFeatureStream:
        """Move the audio received so far into the feature stream (lane thread); returns the stream."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
            ended = self._ended
        for chunk in inbox:
            self._stream.push(chunk)
        if ended and not self._end_applied:
            self._stream.end_of_utterance()
            self._end_applied = True
        return self._stream

    @property
    def closed(self) -> bool:
        return self._closed

    def pull_ahead(self, frames: int) -> None:
        """Lane thread, before a batch's jobs run: compute the features of this utterance's next `frames`
        frames in
        one pull (one window gather for all of its jobs in the batch); `render_requests` then takes them."""
        missing = frames - len(self._pulled)
        if missing > 0 and not self._closed:
            self._pulled.extend(self._stream.pull(max_frames=missing))

    def render_requests(self, frame_indices: list[int], ticks: list[int]) -> Sequence[Any]:
        if self._closed:
            raise UtteranceClosed(f"frames {frame_indices[:1]}..: the utterance's stream was closed")
        gap = frame_indices[0] - self._next_frame if frame_indices else 0
        if gap < 0:
            raise FramesOutOfOrder(
                f"frames {frame_indices[0]}..{frame_indices[-1]}: frame {self._next_frame} was pulled already"
            )
        if gap > 0:
            # A job ahead of an earlier one of this stream: its frames stay aligned with their audio if the
            # earlier frames' features are passed over (those frames are lost, not the rest of the utterance).
            logger.warning(
                "render job ahead of its stream: passing over frames",
                extra={"expected_frame": self._next_frame, "frame": frame_indices[0], "passed_over": gap},
            )
        features = self._take_features(gap + len(frame_indices))[gap:]
        self._next_frame += gap + len(features)
        return [
            RenderRequest(self._avatar, tick, feature.features, feature.speech_weight)
            for feature, tick in zip(features, ticks, strict=True)
        ]

    def _take_features(self, count: int) -> list[FeatureFrame]:
        """The stream's next `count` feature frames (pulled ahead by `pull_ahead`, or pulled now)."""
        missing = count - len(self._pulled)
        if missing > 0:
            # Audio that arrived after the lane's batched encode (`prepare_features`) waits for the next batch
            # when the stream already holds these frames: applying it now would grow the encoded segment and
            # make this pull re-encode it alone, once per job (at 8 sessions that doubled the lane's batch
            # time).
            if self._stream.ready_frames < missing:
                self.apply_inbox()
            self._pulled.extend(self._stream.pull(max_frames=missing))
        if len(self._pulled) < count:
            raise ValueError(f"asked for {count} frames, the feature stream had {len(self._pulled)} ready")
        features, self._pulled = self._pulled[:count], self._pulled[count:]
        return features

    def close(self) -> None:
        with self._lock:
            self._inbox = []
            self._closed = True
        self._pulled = []


class _SessionView:
    def __init__(self, engine: Engine, avatar: Avatar) -> None:
        self._engine = engine
        self._avatar = avatar
        self._view = _AvatarView(avatar)

    @property
    def avatar(self) -> AvatarView:
        return self._view

    @property
    def lookahead_ms(self) -> int:
        return self._engine.timing.lookahead_ms

    def open_utterance(self) -> UtteranceStream:
        return _Utterance(self._engine, self._avatar)


class EngineAdapter:
    """`EngineService` over `realtime.engine`. The engine is built on first use (never at import)."""

    def __init__(self, config: EngineConfig, *, engine: Engine | None = None, reason: str = "") -> None:
        """`engine`: an engine built elsewhere (benchmarks with full-size random weights); default: built from
        `config` by `realtime.engine.registry.create_engine` on first use."""
        self.config = config
        self._engine: Engine | None = engine
        self._reason = reason
        self._warm = False
        self._lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                selection = create_engine(self.config)
                check_timing(selection.engine.timing)
                self._engine, self._reason = selection.engine, selection.reason
            return self._engine

    def info(self) -> EngineStatus:
        if self._engine is None:
            return EngineStatus(
                name=self.config.engine, device=self.config.device, warm=False, detail="not loaded yet"
            )
        info = self._engine.info
        return EngineStatus(
            name=info.name,
            device=info.device,
            warm=self._warm,
            detail=self._reason or info.detail,
            serving=self._engine.serving_state().describe() if self._warm else "",
        )

    def warm_up(self) -> bool:
        if self._warm:
            return True
        # Every shape a session may render, so no session frame waits for a graph capture or compile.
        report = self.engine.warm_up_for_serving(self.config.artifacts_dir)
        logger.info(
            "engine warm",
            extra={
                "artifacts": report.status,
                "warm_up_ms": round(report.warm_up_ms, 1),
                "refused": report.refused,
            },
        )
        self._warm = True
        return False

    def warm_up_batch_ms(self) -> dict[int, float]:
        return self.engine.warm_up_batch_ms

    def prepare_avatar(
        self, asset: AvatarAsset, on_progress: Callable[[PrepareProgress], None]
    ) -> tuple[PreparedAvatar, object]:
        avatar = self.engine.prepare_avatar(asset.path, on_progress=on_progress)
        if asset.digest_sha256 and asset.digest_sha256 != avatar.digest_sha256:
            logger.warning(
                "avatar digest differs from the fetched asset's",
                extra={"expected": asset.digest_sha256, "prepared": avatar.digest_sha256},
            )
        prepared = PreparedAvatar(
            digest_sha256=avatar.digest_sha256,
            cache_dir=avatar.cache_dir,
            frame_count=avatar.frame_count,
            width_px=avatar.width_px,
            height_px=avatar.height_px,
            cache_hit=avatar.cache_hit,
        )
        return prepared, avatar

    def open_session(self, avatar: object) -> SessionEngine:
        if not isinstance(avatar, Avatar):
            raise TypeError(f"expected a prepared Avatar, got {type(avatar).__name__}")
        return _SessionView(self.engine, avatar)

    def render(self, requests: Sequence[Any]) -> list[np.ndarray]:
        return self.engine.render(requests)

    def render_async(self, requests: Sequence[Any]) -> RenderHandle:
        return self.engine.render_async(requests)

    def prepare_features(self, jobs: Sequence[tuple[object, int]]) -> int:
        """Before a lane batch: encode every job's pending audio in one engine call
        (`RenderLane(prepare=...)`)."""
        streams, counts = [], []
        # A closed source's jobs raise UtteranceClosed when they run: nothing of theirs is encoded.
        live = [
            (source, frames)
            for source, frames in jobs
            if isinstance(source, _Utterance) and not source.closed
        ]
        for source, frames in live:
            streams.append(source.apply_inbox())
            counts.append(frames)
        encoded = self.engine.prefetch_features(streams, counts) if streams else 0
        for source, frames in live:
            source.pull_ahead(frames)  # after the batched encode: each source's frames in one gather
        return encoded

    def release_avatar(self, avatar: object) -> None:
        if self._engine is not None and isinstance(avatar, Avatar):
            self._engine.forget_avatar(avatar)
