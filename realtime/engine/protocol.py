"""The engine contract: what the sidecar, the CLI and the benchmarks call on any lip-sync engine.

`Engine` declares every method a caller uses; `EngineBase` gives the optional capabilities
(batched feature prefetch, device memory per avatar, prebuilt warm-up artifacts, asynchronous
render) their do-nothing defaults, so a new engine implements only what it has. An engine is
registered by name in `realtime.engine.registry`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from realtime.engine.accel import AccelConfig
from realtime.engine.artifacts import PrebuiltWarmUp
from realtime.engine.audio.framing import CONTEXT_FRAMES, SAMPLE_RATE_HZ, VIDEO_FPS
from realtime.engine.audio.levels import SpeechGateConfig
from realtime.engine.audio.stream import AudioFeatureStream, FeatureFrame
from realtime.engine.avatar.prepare import PrepareSettings
from realtime.engine.avatar.prepared import Avatar, PrepareProgress
from realtime.engine.hotswap import ServingState

STAGES = ("features", "unet", "vae_decode", "blend")
# Batch sizes an engine without shape buckets warms up for serving (the render lane's common batches).
DEFAULT_WARM_UP_BATCH_SIZES = (1, 4, 8)


@dataclass(frozen=True)
class EngineConfig:
    engine: str = "auto"  # "auto" or a name registered in realtime.engine.registry
    model_dir: Path = Path("models")
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" (fp16 on CUDA, fp32 on CPU) | "float16" | "bfloat16" | "float32"
    cache_dir: Path | None = None  # avatar cache root; default $LIPSYNC_CACHE_DIR/avatars or ~/.cache/...
    cache_max_bytes: int | None = None  # the avatar cache's cap (least recently used evicted); None: none
    cpu_threads: int | None = None  # torch intra-op threads on CPU; default: the cores this process may use
    max_batch_size: int = 32  # render calls are split into chunks of this size (at most the largest bucket)
    accel: AccelConfig = field(default_factory=AccelConfig)  # GPU speed-ups: buckets, graphs, compile
    # Prebuilt compiled kernels (`lipsync engine build`, realtime.engine.artifacts) that warm-up loads;
    # default $LIPSYNC_CACHE_DIR/engine-artifacts or ~/.cache/lipsync-live/engine-artifacts.
    artifacts_dir: Path | None = None
    prepare: PrepareSettings = field(default_factory=PrepareSettings)
    gate: SpeechGateConfig = field(default_factory=SpeechGateConfig)


@dataclass(frozen=True)
class EngineInfo:
    """What an engine is: its registered name, version and where it runs."""

    name: str  # its name in realtime.engine.registry
    version: str  # part of the avatar cache key
    device: str
    dtype: str
    model_dir: Path | None
    detail: str


@dataclass(frozen=True)
class EngineProbe:
    """Whether an engine can be built with a config, and why (the engine registry's "auto" rule asks)."""

    usable: bool
    reason: str  # one sentence for logs and /debug
    problem: Exception | None = None  # when not usable: the error an explicit request for it raises


@dataclass(frozen=True)
class FrameTiming:
    """How an engine's video frames sit on its audio: the sample rate it reads, its frame rate, and how
    many frames of audio past a frame's own end that frame needs before it can be rendered (lookahead)."""

    sample_rate_hz: int = SAMPLE_RATE_HZ
    fps: int = VIDEO_FPS
    lookahead_frames: int = CONTEXT_FRAMES

    @property
    def samples_per_frame(self) -> int:
        return self.sample_rate_hz // self.fps

    @property
    def lookahead_ms(self) -> int:
        return self.lookahead_frames * 1000 // self.fps

    def ready_frames(self, samples: int, *, ended: bool) -> int:
        """Frames of an utterance of `samples` samples that can be rendered: all of them (the last one padded)
        once it ended, else those whose lookahead audio exists."""
        if ended:
            return -(-samples // self.samples_per_frame)
        return max(0, samples // self.samples_per_frame - self.lookahead_frames)


# The timing of `AudioFeatureStream` (16 kHz audio, 25 fps, two frames of right context): both built-in
# engines' streams, and every engine whose `open_stream` returns one.
STREAM_TIMING = FrameTiming()


@dataclass(frozen=True)
class RenderRequest:
    """One output frame: which avatar, where in its ping-pong cycle, and the audio features to speak."""

    avatar: Avatar
    frame_index: int  # position in the avatar's ping-pong cycle; any int >= 0 (wraps)
    features: Any  # FeatureFrame.features from this engine's stream or offline_frames
    speech_weight: float = 1.0  # 0: idle frame returned, engine not run; (0, 1): crossfade with idle

    @staticmethod
    def for_frame(avatar: Avatar, frame_index: int, feature: FeatureFrame) -> RenderRequest:
        return RenderRequest(avatar, frame_index, feature.features, feature.speech_weight)


@dataclass
class StageProfile:
    """Wall time per stage in ms, accumulated over render calls (device-synchronised when on CUDA)."""

    ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    frames: int = 0
    sync: Callable[[], None] | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.sync:
            self.sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - started) * 1000


@contextmanager
def maybe_stage(profile: StageProfile | None, name: str) -> Iterator[None]:
    if profile is None:
        yield
    else:
        with profile.stage(name):
            yield


class RenderHandle(Protocol):
    """A render call in flight (`Engine.render_async`)."""

    def result(self) -> list[np.ndarray]:
        """The composited frames, one per request, in order (waits for the device work)."""
        ...

    def ready(self) -> bool:
        """The device work is done: `result()` will not wait for it."""
        ...

    def device_ms(self) -> float | None:
        """Once ready: the device time of the work (None: not measured, e.g. on CPU)."""
        ...

    def host_ms(self) -> float | None:
        """Once `result()` returned: its time on the host after the device was done (frame assembly); None
        when not measured."""
        ...


@dataclass
class RenderedFrames:
    """A `RenderHandle` whose frames are already there (engines that render synchronously)."""

    frames: list[np.ndarray]

    def result(self) -> list[np.ndarray]:
        return self.frames

    def ready(self) -> bool:
        return True

    def device_ms(self) -> float | None:
        return None

    def host_ms(self) -> float | None:
        return None


class Engine(Protocol):
    """A lip-sync engine: avatars in, audio features in, composited frames out. Synchronous: call every
    method from one thread (the sidecar's render lane)."""

    @property
    def info(self) -> EngineInfo: ...

    @property
    def timing(self) -> FrameTiming:
        """Sample rate, frame rate and lookahead of this engine's feature streams."""
        ...

    def prepare_avatar(
        self, source: bytes | Path, *, on_progress: Callable[[PrepareProgress], None] | None = None
    ) -> Avatar: ...

    def forget_avatar(self, avatar: Avatar) -> None:
        """Release what the engine holds for an avatar no session uses any more (e.g. its device copies)."""
        ...

    def open_stream(self) -> AudioFeatureStream: ...

    def prefetch_features(self, streams: Sequence[AudioFeatureStream], max_frames: Sequence[int]) -> int:
        """Compute in one batched call what `streams[i].pull(max_frames[i])` would each compute, so the pulls
        find it cached; returns the number of units encoded (0: this engine has nothing to batch)."""
        ...

    def offline_frames(self, audio: np.ndarray) -> list[FeatureFrame]: ...

    def render(
        self, requests: Sequence[RenderRequest], *, profile: StageProfile | None = None
    ) -> list[np.ndarray]: ...

    def render_async(
        self, requests: Sequence[RenderRequest], *, profile: StageProfile | None = None
    ) -> RenderHandle:
        """`render`, split: enqueue the work and return; the handle's `result()` (same thread, in call order)
        returns the frames. Lets the caller prepare its next batch while the device computes this one."""
        ...

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> float: ...

    def warm_up_for_serving(self, artifacts_dir: Path | None = None) -> PrebuiltWarmUp:
        """Warm every shape a session may render (no session frame waits for a compile or capture), from
        prebuilt artifacts under `artifacts_dir` where the engine has them."""
        ...

    @property
    def warm_up_batch_ms(self) -> dict[int, float]:
        """Render wall time per batch size, timed at the end of the last `warm_up` (empty: not measured)."""
        ...

    def serving_state(self) -> ServingState:
        """Which variant of the engine renders now and which one a background build will swap in."""
        ...


class EngineBase:
    """The optional capabilities' defaults: subclass it and implement `info`, `prepare_avatar`,
    `open_stream`, `offline_frames` and `render`."""

    @property
    def timing(self) -> FrameTiming:
        return STREAM_TIMING

    def forget_avatar(self, avatar: Avatar) -> None:
        """Nothing held per avatar beyond the avatar itself."""

    def prefetch_features(self, streams: Sequence[AudioFeatureStream], max_frames: Sequence[int]) -> int:
        return 0

    def render(
        self, requests: Sequence[RenderRequest], *, profile: StageProfile | None = None
    ) -> list[np.ndarray]:
        raise NotImplementedError

    def render_async(
        self, requests: Sequence[RenderRequest], *, profile: StageProfile | None = None
    ) -> RenderHandle:
        return RenderedFrames(self.render(requests, profile=profile))  # synchronous: nothing to overlap

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> float:
        return 0.0

    def warm_up_for_serving(self, artifacts_dir: Path | None = None) -> PrebuiltWarmUp:
        return PrebuiltWarmUp("not_compiled", self.warm_up(DEFAULT_WARM_UP_BATCH_SIZES))

    def serving_state(self) -> ServingState:
        return ServingState("default")  # one variant, ready once warm

    @property
    def warm_up_batch_ms(self) -> dict[int, float]:
        return {}
