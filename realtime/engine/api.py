"""The engine contract both engines implement, and the data that crosses it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from realtime.engine.accel import AccelConfig
from realtime.engine.audio.levels import SpeechGateConfig
from realtime.engine.audio.stream import AudioFeatureStream, FeatureFrame
from realtime.engine.avatar.prepare import PrepareSettings
from realtime.engine.avatar.prepared import Avatar
from realtime.host import PrepareProgress

STAGES = ("features", "unet", "vae_decode", "blend")


@dataclass(frozen=True)
class EngineConfig:
    engine: str = "auto"  # "auto" (musetalk when weights exist, else preview) | "musetalk" | "preview"
    model_dir: Path = Path("models")
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" (fp16 on CUDA, fp32 on CPU) | "float16" | "bfloat16" | "float32"
    cache_dir: Path | None = None  # avatar cache root; default $LIPSYNC_CACHE_DIR/avatars or ~/.cache/...
    cache_max_bytes: int | None = None  # the avatar cache's cap (least recently used entries evicted); None: none
    cpu_threads: int | None = None  # torch intra-op threads on CPU; default: the cores this process may use
    max_batch_size: int = 32  # larger render calls are split into chunks of this size (at most the largest bucket)
    accel: AccelConfig = field(default_factory=AccelConfig)  # GPU speed-ups: buckets, graphs, compile, transfers
    # Prebuilt compiled kernels (`lipsync engine build`, realtime.engine.artifacts) that warm-up loads; default
    # $LIPSYNC_CACHE_DIR/engine-artifacts or ~/.cache/lipsync-live/engine-artifacts.
    artifacts_dir: Path | None = None
    prepare: PrepareSettings = field(default_factory=PrepareSettings)
    gate: SpeechGateConfig = field(default_factory=SpeechGateConfig)


@dataclass(frozen=True)
class EngineInfo:
    name: str  # "musetalk" | "preview"
    version: str  # part of the avatar cache key
    device: str
    dtype: str
    model_dir: Path | None
    detail: str


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
        """Once `result()` returned: its time on the host after the device was done (frame assembly); None when
        not measured."""
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
    """Implemented by `MuseTalkEngine` and `PreviewEngine`. Synchronous; call from one thread."""

    @property
    def info(self) -> EngineInfo: ...

    def prepare_avatar(
        self, source: bytes | Path, *, on_progress: Callable[[PrepareProgress], None] | None = None
    ) -> Avatar: ...

    def open_stream(self) -> AudioFeatureStream: ...

    def offline_frames(self, audio: np.ndarray) -> list[FeatureFrame]: ...

    def render(self, requests: Sequence[RenderRequest], *, profile: StageProfile | None = None) -> list[np.ndarray]: ...

    def render_async(self, requests: Sequence[RenderRequest], *, profile: StageProfile | None = None) -> RenderHandle:
        """`render`, split: enqueue the work and return; the handle's `result()` (same thread, in call order)
        returns the frames. Lets the caller prepare its next batch while the device computes this one."""
        ...

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> float: ...

    @property
    def warm_up_batch_ms(self) -> dict[int, float]:
        """Render wall time per batch size, timed at the end of the last `warm_up` (empty: not measured)."""
        ...
