"""The engine seam: an engine registered from a test (no production edits) is what the sidecar builds, warms
and renders with; the registry is the one list of engine names and holds the "auto" rule."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infra.cli.sidecar import add_sidecar_arguments
from realtime.engine.audio.levels import frame_rms_dbfs
from realtime.engine.audio.stream import AudioFeatureStream, FeatureFrame
from realtime.engine.avatar.prepare import prepare_avatar
from realtime.engine.avatar.prepared import Avatar, PrepareProgress
from realtime.engine.errors import EngineError, ModelFilesMissing
from realtime.engine.protocol import (
    EngineBase,
    EngineConfig,
    EngineInfo,
    EngineProbe,
    FrameTiming,
    RenderRequest,
    StageProfile,
)
from realtime.engine.registry import (
    EngineEntry,
    EngineUnknown,
    auto_choice,
    create_engine,
    engine_choices,
    register,
    unregister,
)
from realtime.host import AvatarAsset, OpenedOutput
from realtime.ingest.resample import ConvertedAudio
from realtime.sidecar.config import HostConfig, SidecarSettings
from realtime.sidecar.engine_adapter import EngineTimingUnsupported
from realtime.sidecar.process import build_host
from tests.support import media
from tests.support.recording import RecordingPublisher

MARKER_RGB = (
    255,
    0,
    255,
)  # no avatar frame has it: a speech frame in this colour came from the marker engine


class MarkerFeaturizer:
    """One level per frame: what the stream hands `MarkerEngine.render` as features."""

    def reset(self) -> None:
        """Stateless."""

    def encode_plan(
        self, audio: np.ndarray, audio_base: int, frames: range, valid_positions: int
    ) -> list[Any]:
        return []

    def features(self, audio: np.ndarray, audio_base: int, frames: range, valid_positions: int) -> list[Any]:
        start = frames.start * 640 - audio_base
        return list(frame_rms_dbfs(audio[start : start + len(frames) * 640]))


class MarkerEngine(EngineBase):
    """A trivial engine: speaking frames are painted one colour; everything else comes from `EngineBase`."""

    def __init__(self, config: EngineConfig, timing: FrameTiming | None = None) -> None:
        self._config = config
        self._timing = timing or FrameTiming()
        self.rendered = 0
        self.forgotten: list[str] = []

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            "marker", "marker-1", "cpu", "uint8", None, "test engine: speech frames are magenta"
        )

    @property
    def timing(self) -> FrameTiming:
        return self._timing

    def prepare_avatar(
        self, source: bytes | Path, *, on_progress: Callable[[PrepareProgress], None] | None = None
    ) -> Avatar:
        return prepare_avatar(
            source,
            engine="marker",
            engine_version="marker-1",
            cache_root=self._config.cache_dir,
            on_progress=on_progress,
            settings=self._config.prepare,
        )

    def forget_avatar(self, avatar: Avatar) -> None:
        self.forgotten.append(avatar.key)

    def open_stream(self) -> AudioFeatureStream:
        return AudioFeatureStream(MarkerFeaturizer(), self._config.gate)

    def offline_frames(self, audio: np.ndarray) -> list[FeatureFrame]:
        stream = self.open_stream()
        stream.push(audio)
        stream.end_of_utterance()
        return stream.pull()

    def render(
        self, requests: Sequence[RenderRequest], *, profile: StageProfile | None = None
    ) -> list[np.ndarray]:
        frames = []
        for request in requests:
            frame = np.array(request.avatar.frames[request.avatar.frame_at(request.frame_index)])
            if request.speech_weight > 0:
                frame[:] = MARKER_RGB
            frames.append(frame)
        self.rendered += len(requests)
        return frames


def _never_auto(config: EngineConfig) -> EngineProbe:
    return EngineProbe(usable=True, reason="the marker engine needs nothing")


@pytest.fixture
def marker() -> Iterator[list[MarkerEngine]]:
    built: list[MarkerEngine] = []

    def build(config: EngineConfig) -> MarkerEngine:
        built.append(MarkerEngine(config))
        return built[-1]

    register(EngineEntry("marker", "a test engine that paints speech frames", build, _never_auto))
    try:
        yield built
    finally:
        unregister("marker")


def _speech(seconds: float = 1.0, tone_hz: float = 220.0) -> ConvertedAudio:
    """A loud tone as the sidecar's ingest hands it on: 16 kHz for the engine, 48 kHz for playout."""

    def tone(rate_hz: int) -> np.ndarray:
        return (0.3 * np.sin(2 * np.pi * tone_hz * np.arange(int(rate_hz * seconds)) / rate_hz)).astype(
            np.float32
        )

    return ConvertedAudio(tone(16_000), tone(48_000))


async def test_an_engine_registered_from_a_test_renders_a_sidecar_session(
    marker: list[MarkerEngine], tmp_path: Path
) -> None:
    """The sidecar's real path (settings -> build_host -> engine adapter -> render lane -> session runtime)
    builds the registered engine by name, warms it, prepares the avatar with it and publishes its frames."""
    assert "marker" in engine_choices()
    parser = argparse.ArgumentParser()
    add_sidecar_arguments(parser)
    assert "marker" in parser.format_help()  # the sidecar's --engine choices come from the registry
    host = build_host(
        SidecarSettings(
            engine="marker",
            device="cpu",
            cache_dir=tmp_path / "cache",
            host=HostConfig(sidecar_id="seam", task_queue="seam", slots_total=1),
        )
    )
    avatar_zip = tmp_path / "avatar.zip"
    avatar_zip.write_bytes(media.frames_zip())
    try:
        warm = await host.warm_up()
        assert (warm.engine, warm.already_warm) == ("marker", False)
        progress: list[PrepareProgress] = []
        prepared = await host.prepare_avatar("s1", AvatarAsset(avatar_zip, "frames_zip", ""), progress.append)
        await asyncio.sleep(0.05)  # progress is reported from the lane thread through the loop
        assert (
            prepared.frame_count == 6 and progress and progress[-1].frames_done == progress[-1].frames_total
        )
        publisher = RecordingPublisher(prepared.width_px, prepared.height_px)
        await host.start_publishing("s1", [publisher], OpenedOutput("recording", "test recording"))
        runtime = host.runtime("s1")
        assert runtime is not None
        runtime.ingest(_speech(), "test", time.monotonic())
        runtime.end_utterance()
        deadline = time.monotonic() + 20.0
        while len(publisher.speech_ticks()) < 25:
            assert time.monotonic() < deadline, f"{len(publisher.speech_ticks())} speech frames published"
            await asyncio.sleep(0.05)
        speech = publisher.speech_ticks()
        assert all((tick.frame_rgb == MARKER_RGB).all() for tick in speech)
        assert not any((tick.frame_rgb == MARKER_RGB).all() for tick in publisher.ticks if tick not in speech)
        assert marker[0].rendered >= 25 and host.engine_info().name == "marker"
    finally:
        await host.teardown("s1")
        await host.close()
    assert len(marker) == 1 and len(marker[0].forgotten) == 1  # the session's end released its avatar


async def test_an_engine_on_another_frame_rate_is_refused_by_the_sidecar(tmp_path: Path) -> None:
    register(
        EngineEntry(
            "marker-30fps",
            "renders at 30 fps",
            lambda config: MarkerEngine(config, FrameTiming(fps=30)),
            _never_auto,
        )
    )
    try:
        host = build_host(SidecarSettings(engine="marker-30fps", cache_dir=tmp_path))
        with pytest.raises(EngineTimingUnsupported, match="30 fps") as refused:
            await host.warm_up()
        assert refused.value.code == "engine_timing_unsupported"
        await host.close()
    finally:
        unregister("marker-30fps")


def test_auto_tries_engines_in_rank_order_and_a_broken_one_fails_the_choice(tmp_path: Path) -> None:
    def absent(config: EngineConfig) -> EngineProbe:
        return EngineProbe(
            usable=False, reason="no marker files", problem=ModelFilesMissing("no marker files")
        )

    def broken(config: EngineConfig) -> EngineProbe:
        raise ModelFilesMissing("marker files half downloaded")

    config = EngineConfig(engine="auto", model_dir=tmp_path / "empty")
    assert auto_choice(config)[0].name == "preview"  # no MuseTalk weights: the preview engine
    register(EngineEntry("marker-first", "ranked first", MarkerEngine, _never_auto, auto_rank=-1))
    try:
        chosen, why = auto_choice(config)
        assert chosen.name == "marker-first" and why == "the marker engine needs nothing"
        selection = create_engine(config)
        assert selection.name == "marker-first" and isinstance(selection.engine, MarkerEngine)
    finally:
        unregister("marker-first")
    register(EngineEntry("marker-absent", "absent", MarkerEngine, absent, auto_rank=-1))
    try:
        chosen, why = auto_choice(config)
        assert chosen.name == "preview" and why.startswith("no marker files; no MuseTalk weights")
        with pytest.raises(ModelFilesMissing, match="no marker files"):
            create_engine(EngineConfig(engine="marker-absent"))
    finally:
        unregister("marker-absent")
    register(EngineEntry("marker-broken", "broken", MarkerEngine, broken, auto_rank=-1))
    try:
        with pytest.raises(ModelFilesMissing, match="half downloaded"):
            auto_choice(config)
    finally:
        unregister("marker-broken")


def test_unknown_and_taken_engine_names_are_refused() -> None:
    with pytest.raises(
        EngineUnknown, match="unknown engine 'nope'; choose one of auto, musetalk, preview"
    ) as unknown:
        create_engine(EngineConfig(engine="nope"))
    assert isinstance(unknown.value, EngineError) and unknown.value.code == "engine_unknown"
    for taken in ("auto", "preview"):
        with pytest.raises(ValueError, match="is taken"):
            register(EngineEntry(taken, "", MarkerEngine, _never_auto))
