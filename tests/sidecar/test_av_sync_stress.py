"""Stress, end to end: lip sync holds at a real subscriber while the sidecar is stopped and the CPU is starved.

A real sidecar process (`python -m realtime`, preview engine) publishes into a real livekit-server;
a real subscriber (`livekit.rtc`, this process) records what it receives. A CPU hog runs the whole
time on the sidecar's core. The sidecar is SIGSTOPped for 250 ms twice — once in the middle of an utterance, once while
idle (the case where the audio used to slip ~200-400 ms behind the lips and never recover) — and
the utterances after each stall are measured with the method of docs/audio-protocol.md §4.1
(tests/sidecar/avcheck.py): |A/V offset| <= 40 ms (one frame), median and at the speech onset.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets

from infra.livekit import LiveKitServerConfig
from infra.paths import PROJECT_ROOT
from infra.process import free_port, log_tail
from tests.sidecar.avcheck import RoomRecorder, align, av_offset, envelope_correlation, speech_onset, token
from tests.sidecar.conftest import SpeechClip, espeak
from tests.sidecar.test_livekit_e2e import next_of, stream_realtime

pytestmark = pytest.mark.service

SENTENCES = (
    "The rain in Spain stays mainly in the plain, said the professor.",
    "Seven silver swans swam silently southward before sunrise.",
    "Please bring the blue book and the red pen to the meeting room.",
    "A quick test of lips and voice after the stall has passed.",
)
STALL_S = 0.25
MAX_OFFSET_MS = 40.0  # one frame


def on_sidecar_core(argv: list[str]) -> list[str]:
    """The sidecar and the hog share one core (`taskset`: every thread they start inherits it), so the hog starves
    the sidecar, while the subscriber (this process, a viewer's device in real life) and livekit-server run where
    they can."""
    taskset = shutil.which("taskset")
    if taskset is None:
        pytest.fail("taskset is not installed (apt-get install util-linux)")
    return [taskset, "-c", "0", *argv]


@dataclass
class SidecarChild:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stall(self, seconds: float) -> None:
        """SIGSTOP the whole process (event loop, WebRTC threads, the audio source's pull thread), then SIGCONT."""
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(self.process.pid, signal.SIGCONT)


@pytest.fixture
async def sidecar_child(tmp_path: Path) -> AsyncIterator[SidecarChild]:
    port = free_port()
    log_path = tmp_path / "sidecar.log"
    with log_path.open("wb") as log:
        argv = [
            sys.executable, "-m", "realtime", "--port", str(port), "--engine", "preview", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "--slots", "1", "--sidecar-id", "stress",
        ]  # fmt: skip
        process = subprocess.Popen(  # noqa: ASYNC220 (returns at once; the wait below is async)
            on_sidecar_core(argv), cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT
        )
    child = SidecarChild(process, port, log_path)
    try:
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
            while True:
                if process.poll() is not None:
                    raise AssertionError(f"sidecar exited with {process.returncode}:\n{log_tail(log_path)}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{child.base_url}/healthz")).status_code == 200:
                        break
                assert time.monotonic() < deadline, f"sidecar did not start:\n{log_tail(log_path)}"
                await asyncio.sleep(0.2)
        yield child
    finally:
        os.kill(process.pid, signal.SIGCONT)  # never leave it stopped
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture
def cpu_hog() -> Any:
    """A process that spins on one core for the whole test (the sidecar shares the machine with other work)."""
    hog = subprocess.Popen(on_sidecar_core([sys.executable, "-c", "while True: pass"]))
    try:
        yield hog
    finally:
        hog.kill()
        hog.wait(timeout=5)


@pytest.fixture(scope="module")
def sentences(tmp_path_factory: pytest.TempPathFactory) -> list[SpeechClip]:
    return [espeak(tmp_path_factory.mktemp(f"s{index}"), text) for index, text in enumerate(SENTENCES)]


@dataclass
class Utterance:
    clip: SpeechClip
    start_frame_id: int
    sent_at_s: float
    label: str


def measure(recorder: RoomRecorder, utterance: Utterance) -> tuple[float, float, float]:
    """(median offset, onset offset, envelope r) of one utterance; the received audio is searched only around it."""
    sent48 = utterance.clip.at_48k()
    arrivals = np.array([arrival for arrival, _ in recorder.audio_chunks])
    starts = np.cumsum([0] + [len(chunk) for _, chunk in recorder.audio_chunks])
    first = int(np.searchsorted(arrivals, utterance.sent_at_s - 0.5))
    last = int(np.searchsorted(arrivals, utterance.sent_at_s + utterance.clip.duration_s + 2.0))
    received = recorder.audio()
    window = received[starts[first] : starts[last]]
    lag, _ = align(window, sent48)
    correlation = envelope_correlation(window, sent48, lag)
    offset = av_offset(recorder, int(starts[first]) + lag, utterance.start_frame_id, len(sent48), speech_onset(sent48))
    return offset.median_ms, offset.onset_ms, correlation


async def speak(ws: websockets.ClientConnection, clip: SpeechClip, label: str, stall: Any = None) -> Utterance:
    sent_at_s = time.monotonic()
    sender = asyncio.create_task(stream_realtime(ws, clip))
    if stall is not None:
        await asyncio.sleep(clip.duration_s / 2)
        await asyncio.to_thread(stall)  # off this loop: the subscriber keeps recording arrival times
    await sender
    await ws.send(json.dumps({"type": "end_of_utterance"}))
    started = await next_of(ws, "playback_started")
    await next_of(ws, "playback_finished")
    return Utterance(clip, int(started["frame_id"]), sent_at_s, label)


async def test_lip_sync_holds_at_a_subscriber_through_process_stalls_and_a_cpu_hog(
    sidecar_child: SidecarChild,
    cpu_hog: Any,
    livekit_server: LiveKitServerConfig,
    avatar_zip_path: Path,
    sentences: list[SpeechClip],
) -> None:
    session_id, room = "stress-sync", "room-stress-sync"
    identity = f"avatar-{session_id}"
    body = {
        "avatar_path": str(avatar_zip_path),
        "livekit": {
            "url": livekit_server.ws_url,
            "room": room,
            "identity": identity,
            "token": token(livekit_server, identity, room),
        },
    }
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        response = await client.post(f"{sidecar_child.base_url}/v1/sessions/{session_id}", json=body)
        assert response.status_code == 200, response.text
    recorder = RoomRecorder(mouth_box=(0, 0, 8, 8))
    await recorder.connect(livekit_server.ws_url, token(livekit_server, "viewer", room))
    utterances: list[Utterance] = []

    try:
        await recorder.wait_for(lambda: len(recorder.frames) >= 25 and len(recorder.audio_chunks) >= 50, 20)
        url = f"ws://127.0.0.1:{sidecar_child.port}/v1/sessions/{session_id}/audio?sample_rate={sentences[0].rate_hz}"
        async with websockets.connect(url) as ws:
            await next_of(ws, "ready")
            stall = lambda: sidecar_child.stall(STALL_S)  # noqa: E731
            utterances.append(await speak(ws, sentences[0], "stalled mid-utterance", stall=stall))
            await asyncio.sleep(0.5)
            utterances.append(await speak(ws, sentences[1], "after a stall mid-utterance"))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(sidecar_child.stall, STALL_S)  # while idle
            await asyncio.sleep(0.5)
            utterances.append(await speak(ws, sentences[2], "after a stall while idle"))
            await asyncio.sleep(0.3)
            utterances.append(await speak(ws, sentences[3], "second after the idle stall"))
        await asyncio.sleep(1.0)
        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            stats = (await client.get(f"{sidecar_child.base_url}/v1/sessions/{session_id}/stats")).json()
    finally:
        await recorder.close()
        async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
            with contextlib.suppress(httpx.HTTPError):
                await client.delete(f"{sidecar_child.base_url}/v1/sessions/{session_id}")

    results = []
    for utterance in utterances:
        median_ms, onset_ms, correlation = measure(recorder, utterance)
        results.append((utterance.label, round(median_ms, 1), round(onset_ms, 1), round(correlation, 3)))
    extra = stats["extra"]
    print(
        "\nA/V offset at the subscriber (median, onset ms, envelope r):",
        results,
        {key: value for key, value in extra.items() if any(word in key for word in ("resync", "av_offset", "renew"))},
        f"sidecar lateness p99 {stats['lateness_ms_p99']}",
    )
    # The stalls really happened: the sidecar's clock saw them, and the one in speech renewed the audio track.
    assert extra["clock_resyncs"] + extra.get("livekit_audio_underruns", 0.0) >= 1, extra
    assert extra.get("livekit_audio_track_renewals", 0.0) >= 1, extra
    for label, median_ms, onset_ms, correlation in results[1:]:
        # The alignment found the utterance (the receiver's jitter buffer time-stretches a little under this load).
        assert correlation >= 0.8, (label, results)
        assert abs(median_ms) <= MAX_OFFSET_MS, (label, results)
        assert abs(onset_ms) <= MAX_OFFSET_MS, (label, results)
    # Every sample is accounted for: what the re-anchoring dropped is counted, nothing vanished.
    assert stats["audio_samples_received"] == (
        stats["audio_samples_rendered"]
        + stats["audio_samples_pending"]
        + stats["audio_samples_rejected"]
        + stats["audio_samples_flushed"]
    )
    assert (
        stats["audio_samples_published"] + int(extra["livekit_audio_samples_dropped"])
        == (stats["audio_samples_rendered"])
    )
