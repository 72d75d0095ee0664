from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from realtime.engine.avatar.prepared import Avatar
from realtime.engine.musetalk.engine import MuseTalkEngine
from realtime.engine.preview import PreviewEngine
from tests.support.engine_media import astronaut_frames, frames_zip, speech_16k


@pytest.fixture(scope="session", autouse=True)
def _bounded_torch_threads() -> None:
    from realtime.engine.device import configure_cpu_threads

    configure_cpu_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random MuseTalk checkpoint written by `lipsync models make-tiny`."""
    from infra.cli import main

    directory = tmp_path_factory.mktemp("models")
    assert main(["models", "make-tiny", str(directory)]) == 0
    return directory


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return speech_16k(tmp_path_factory.mktemp("speech"))


@pytest.fixture(scope="session")
def frames() -> list[np.ndarray]:
    return astronaut_frames()


@pytest.fixture(scope="session")
def avatar_zip(frames: list[np.ndarray]) -> bytes:
    return frames_zip(frames)


@pytest.fixture(scope="session")
def musetalk_engine(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> MuseTalkEngine:
    from realtime.engine import EngineConfig, create_engine

    selection = create_engine(
        EngineConfig(
            engine="auto", model_dir=tiny_model_dir, device="cpu", cache_dir=tmp_path_factory.mktemp("cache")
        )
    )
    assert selection.name == "musetalk" and isinstance(selection.engine, MuseTalkEngine)
    return selection.engine


@pytest.fixture(scope="session")
def preview_engine(tmp_path_factory: pytest.TempPathFactory) -> PreviewEngine:
    from realtime.engine import EngineConfig, create_engine

    empty = tmp_path_factory.mktemp("no-models")
    selection = create_engine(
        EngineConfig(engine="auto", model_dir=empty, cache_dir=tmp_path_factory.mktemp("pcache"))
    )
    assert selection.name == "preview" and isinstance(selection.engine, PreviewEngine)
    return selection.engine


@pytest.fixture(scope="session")
def musetalk_avatar(musetalk_engine: MuseTalkEngine, avatar_zip: bytes) -> Avatar:
    return musetalk_engine.prepare_avatar(avatar_zip)


@pytest.fixture(scope="session")
def preview_avatar(preview_engine: PreviewEngine, avatar_zip: bytes) -> Avatar:
    return preview_engine.prepare_avatar(avatar_zip)
