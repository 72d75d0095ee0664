"""Sidecar test fixtures: a real avatar (astronaut), real speech (espeak-ng), a running sidecar server."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import soxr

from infra.process import free_port
from realtime.host import (
    AvatarAsset,
    OpenedOutput,
    SessionStats,
)
from realtime.outputs.registry import LIVEKIT
from realtime.sidecar.config import HostConfig, RuntimeConfig, ServerConfig, SidecarSettings
from tests.support.credentials import SIDECAR_SECRET, audio_token
from tests.support.engine_media import astronaut_frames, frames_zip
from tests.support.recording import RecordingPublisher

if TYPE_CHECKING:
    from realtime.sidecar.host import SidecarHost

SENTENCE = "Hello there. The quick brown fox jumps over the lazy dog, and this is a lip sync test."


@dataclass(frozen=True)
class SpeechClip:
    pcm: np.ndarray  # int16 mono at rate_hz, as espeak-ng wrote it
    rate_hz: int

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / self.rate_hz

    def float32(self) -> np.ndarray:
        return self.pcm.astype(np.float32) / 32768.0

    def at_48k(self) -> np.ndarray:
        return np.asarray(soxr.resample(self.float32(), self.rate_hz, 48_000), dtype=np.float32)

    def timeline_samples(self) -> int:
        """Its length on the sidecar's 16 kHz timeline."""
        return round(len(self.pcm) * 16_000 / self.rate_hz)


def espeak(directory: Path, text: str) -> SpeechClip:
    binary = shutil.which("espeak-ng")
    if binary is None:
        pytest.fail("espeak-ng is not installed (apt-get install espeak-ng)")
    path = directory / "speech.wav"
    subprocess.run([binary, "-w", str(path), text], check=True, capture_output=True, timeout=60)
    with wave.open(str(path), "rb") as wav:
        assert wav.getsampwidth() == 2 and wav.getnchannels() == 1
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").copy()
        return SpeechClip(pcm, wav.getframerate())


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> SpeechClip:
    return espeak(tmp_path_factory.mktemp("speech"), SENTENCE)


@pytest.fixture(scope="session")
def avatar_zip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("avatar") / "astronaut.zip"
    path.write_bytes(frames_zip(astronaut_frames(count=12, size=256)))
    return path


@dataclass
class RunningSidecar:
    settings: SidecarSettings
    host: object  # SidecarHost (typed loosely: imported lazily)
    base_url: str
    ws_base: str

    @property
    def sidecar_host(self) -> SidecarHost:
        from realtime.sidecar.host import SidecarHost

        assert isinstance(self.host, SidecarHost)
        return self.host

    async def prepare_recorded(self, session_id: str, avatar_zip_path: Path) -> RecordingPublisher:
        """The session prepared here (slot held, avatar ready), its output not open yet: the publisher that
        `open_recorded` opens for it records what it is sent."""
        avatar = await self.sidecar_host.prepare_avatar(
            session_id, AvatarAsset(avatar_zip_path, "frames_zip", ""), lambda _p: None
        )
        return RecordingPublisher(avatar.width_px, avatar.height_px)

    async def open_recorded(self, session_id: str, publisher: RecordingPublisher) -> None:
        await self.sidecar_host.start_publishing(
            session_id, [publisher], OpenedOutput(LIVEKIT.name, "recording")
        )

    def audio_url(self, session_id: str, **params: object) -> str:
        """The session's audio WebSocket with a fresh audio token for it (as the API hands it out)."""
        params = {**params, "token": audio_token(session_id)}
        query = "&".join(f"{key}={value}" for key, value in params.items())
        return f"{self.ws_base}/v1/sessions/{session_id}/audio" + (f"?{query}" if query else "")


def sidecar_settings(
    cache_dir: Path, *, buffer_limit_ms: int = 60_000, max_message_bytes: int = 1 << 20
) -> SidecarSettings:
    return SidecarSettings(
        bind_host="127.0.0.1",
        port=free_port(),
        engine="preview",
        cache_dir=cache_dir,
        host=HostConfig(
            sidecar_id="sidecar-test",
            task_queue="sidecar-test",
            slots_total=4,
            runtime=RuntimeConfig(buffer_limit_ms=buffer_limit_ms),
        ),
        server=ServerConfig(
            service_secret=SIDECAR_SECRET, max_message_bytes=max_message_bytes, stats_interval_ms=0
        ),
    )


async def start_sidecar(settings: SidecarSettings) -> tuple[RunningSidecar, asyncio.Task[None]]:
    from realtime.sidecar import process

    started = asyncio.Event()
    holder: dict[str, object] = {}

    async def keep_host(host: object) -> None:
        holder["host"] = host
        await asyncio.Event().wait()

    task = asyncio.create_task(process.serve(settings, services=[keep_host], started=started))
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait({task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert started.is_set(), "sidecar did not start"
    running = RunningSidecar(
        settings=settings,
        host=holder["host"],
        base_url=f"http://127.0.0.1:{settings.port}",
        ws_base=f"ws://127.0.0.1:{settings.port}",
    )
    return running, task


async def stop_sidecar(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _publishes_audio(publisher: object) -> bool:
    """False for a LiveKit output with publish_audio off (also behind a switchable output's wrapper)."""
    inner = getattr(publisher, "current", publisher)
    return bool(getattr(getattr(inner, "target", None), "publish_audio", True))


class AccountingWatch:
    """Checks the sample accounting of every session the sidecar tears down: while it is live, and after its
    runtime stopped (unplayed audio then counts as flushed). Whatever a test asserted itself, no session of
    the sidecar fixture ends with samples unaccounted for."""

    def __init__(self, host: object) -> None:
        from realtime.sidecar.host import SidecarHost

        assert isinstance(host, SidecarHost)
        self.host = host
        self.checked: list[str] = []
        self.violations: list[str] = []
        original = host.teardown

        async def teardown(session_id: str) -> None:
            runtime = host.runtime(session_id)
            if runtime is not None:
                self.check(session_id, runtime.stats(), live=True)
            await original(session_id)
            if runtime is not None:
                self.check(session_id, runtime.stats(), live=False)
                publishes_audio = all(_publishes_audio(p) for p in runtime.publishers)
                stats = runtime.stats()
                # Published + dropped (ticks not delivered, speech an interrupt cleared before it played) ==
                # rendered.
                first = runtime.publishers[0].stats().name if runtime.publishers else ""
                dropped = int(stats.extra.get(f"{first}_audio_samples_dropped", 0.0))
                if (
                    publishes_audio
                    and stats.audio_samples_published + dropped != stats.audio_samples_rendered
                ):
                    self.violations.append(f"{session_id}: published + dropped != rendered: {stats}")
                self.checked.append(session_id)

        host.teardown = teardown  # type: ignore[method-assign]

    def check(self, session_id: str, stats: SessionStats, *, live: bool) -> None:
        parts = (
            stats.audio_samples_rendered
            + stats.audio_samples_pending
            + stats.audio_samples_rejected
            + stats.audio_samples_flushed
        )
        if stats.audio_samples_received != parts:
            self.violations.append(f"{session_id} ({'live' if live else 'after teardown'}): {stats}")
        if not live and stats.audio_samples_pending:
            self.violations.append(
                f"{session_id}: {stats.audio_samples_pending} samples pending after teardown"
            )


@pytest.fixture(scope="module")
async def sidecar(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningSidecar]:
    running, task = await start_sidecar(sidecar_settings(tmp_path_factory.mktemp("cache")))
    watch = AccountingWatch(running.host)
    try:
        yield running
    finally:
        await stop_sidecar(task)  # tears down the sessions the tests left
    assert watch.checked, "no session was torn down: the accounting watch saw nothing"
    assert not watch.violations, "\n".join(watch.violations)


async def open_recorded_session(
    sidecar: RunningSidecar, session_id: str, avatar_zip_path: Path
) -> RecordingPublisher:
    """A live session whose output is a RecordingPublisher (every tick kept in memory, no network)."""
    from realtime.sidecar.host import SidecarHost

    host = sidecar.host
    assert isinstance(host, SidecarHost)
    prepared = await host.prepare_avatar(
        session_id, AvatarAsset(avatar_zip_path, "frames_zip", ""), lambda _p: None
    )
    publisher = RecordingPublisher(prepared.width_px, prepared.height_px)
    await host.start_publishing(session_id, [publisher], OpenedOutput(LIVEKIT.name, "recording"))
    return publisher
