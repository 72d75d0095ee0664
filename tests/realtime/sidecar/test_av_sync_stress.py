"""Stress, end to end: lip sync holds at a real subscriber while the sidecar is stopped and the CPU is
starved.

A real sidecar process (`lipsync sidecar --no-temporal`, preview engine) publishes into a real livekit-server;
a real subscriber (`livekit.rtc`, this process) records what it receives, with its receive statistics.
A CPU hog runs the whole time on the sidecar's core. After one utterance before any stall (printed,
not asserted), the sidecar is SIGSTOPped for 250 ms twice — once in the middle of an utterance, once
while idle — and the utterances after each stall are measured with the method of
docs/audio-protocol.md §4.1 (tests/support/avcheck.py): |A/V offset| <= 40 ms (one frame), median
and at the speech onset. The test prints each utterance's offset and the subscriber's audio and video
jitter-buffer delays (what decides the offset at a native subscriber, which does no lip sync).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets

from infra.livekit import LiveKitServerConfig
from tests.realtime.sidecar.test_livekit_e2e import next_of, stream_realtime
from tests.support.avcheck import (
    RoomRecorder,
    align,
    av_offset,
    envelope_correlation,
    mean_jitter_delay_ms,
    speech_onset,
    token,
)
from tests.support.sidecar_child import SidecarChild, on_core_0, sidecar_child
from tests.support.sidecar_harness import SpeechClip, espeak

pytestmark = [pytest.mark.service, pytest.mark.stress]

SENTENCES = (
    "The rain in Spain stays mainly in the plain, said the professor.",
    "Seven silver swans swam silently southward before sunrise.",
    "Please bring the blue book and the red pen to the meeting room.",
    "A quick test of lips and voice after the stall has passed.",
)
STALL_S = 0.25
MAX_OFFSET_MS = 40.0  # one frame
SHOWN_STATS = (
    "resync",
    "av_offset",
    "renew",
    "missed",
    "underrun",
    "dropped_late",
)  # the sidecar's figures the test prints


@pytest.fixture
async def sidecar_process(
    tmp_path: Path, livekit_server: LiveKitServerConfig, avatar_zip_path: Path
) -> AsyncIterator[SidecarChild]:
    # The renewal after a stall is off by default (docs/audio-protocol.md section 4): this scenario is what
    # it is for.
    renew = ("--renew-audio-after-stall-ms", "100")
    async with sidecar_child(
        tmp_path, livekit_server, avatar_zip_path.parent, pinned=True, extra_args=renew
    ) as child:
        yield child


@pytest.fixture
def cpu_hog() -> Any:
    """A process that spins on one core for the whole test (the sidecar shares the machine with other
    work)."""
    hog = subprocess.Popen(on_core_0([sys.executable, "-c", "while True: pass"]))
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
    """(median offset, onset offset, envelope r) of one utterance; the received audio is searched only around
    it."""
    sent48 = utterance.clip.at_48k()
    arrivals = np.array([arrival for arrival, _ in recorder.audio_chunks])
    starts = np.cumsum([0] + [len(chunk) for _, chunk in recorder.audio_chunks])
    first = int(np.searchsorted(arrivals, utterance.sent_at_s - 0.5))
    last = int(np.searchsorted(arrivals, utterance.sent_at_s + utterance.clip.duration_s + 2.0))
    received = recorder.audio()
    window = received[starts[first] : starts[last]]
    lag, _ = align(window, sent48)
    correlation = envelope_correlation(window, sent48, lag)
    offset = av_offset(
        recorder, int(starts[first]) + lag, utterance.start_frame_id, len(sent48), speech_onset(sent48)
    )
    return offset.median_ms, offset.onset_ms, correlation


async def speak(
    ws: websockets.ClientConnection, clip: SpeechClip, label: str, stall: Any = None
) -> Utterance:
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
    sidecar_process: SidecarChild,
    cpu_hog: Any,
    livekit_server: LiveKitServerConfig,
    avatar_zip_path: Path,
    sentences: list[SpeechClip],
) -> None:
    session_id, room = "stress-sync", "room-stress-sync"
    identity = f"avatar-{session_id}"
    await sidecar_process.open_livekit_session(livekit_server, session_id, room, avatar_zip_path, identity)
    recorder = RoomRecorder(mouth_box=(0, 0, 8, 8), stats_interval_s=0.2)
    await recorder.connect(livekit_server.ws_url, token(livekit_server, "viewer", room))
    utterances: list[Utterance] = []

    try:
        await recorder.wait_for(lambda: len(recorder.frames) >= 25 and len(recorder.audio_chunks) >= 50, 20)
        async with websockets.connect(sidecar_process.audio_url(session_id, sentences[0].rate_hz)) as ws:
            await next_of(ws, "ready")
            utterances.append(await speak(ws, sentences[3], "before any stall"))
            await asyncio.sleep(0.5)
            stall = lambda: sidecar_process.stall(STALL_S)  # noqa: E731
            utterances.append(await speak(ws, sentences[0], "stalled mid-utterance", stall=stall))
            await asyncio.sleep(0.5)
            utterances.append(await speak(ws, sentences[1], "after a stall mid-utterance"))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(sidecar_process.stall, STALL_S)  # while idle
            await asyncio.sleep(0.5)
            utterances.append(await speak(ws, sentences[2], "after a stall while idle"))
            await asyncio.sleep(0.3)
            utterances.append(await speak(ws, sentences[3], "second after the idle stall"))
        await asyncio.sleep(1.0)
        stats = await sidecar_process.stats(session_id)
    finally:
        await recorder.close()
        await sidecar_process.close_session(session_id)

    results = []
    receiver = []  # per utterance: the subscriber's mean audio and video jitter-buffer delay (ms)
    for utterance in utterances:
        median_ms, onset_ms, correlation = measure(recorder, utterance)
        results.append((utterance.label, round(median_ms, 1), round(onset_ms, 1), round(correlation, 3)))
        until_s = utterance.sent_at_s + utterance.clip.duration_s + 0.5
        jitter_ms = [
            mean_jitter_delay_ms(recorder.jitter, kind, utterance.sent_at_s, until_s)
            for kind in ("audio", "video")
        ]
        receiver.append(
            (utterance.label, *(None if value is None else round(value, 1) for value in jitter_ms))
        )
    extra = stats["extra"]
    print(
        "\nA/V offset at the subscriber (median, onset ms, envelope r):",
        results,
        {key: value for key, value in extra.items() if any(word in key for word in SHOWN_STATS)},
        f"sidecar lateness p99 {stats['lateness_ms_p99']}",
        "\njitter buffer delay at the subscriber (audio, video ms):",
        receiver,
        [(row.at_s, row.concealed_samples, row.removed_for_acceleration) for row in recorder.jitter[-1:]],
    )
    # The stalls really happened: the sidecar's clock saw them, and renewed the audio track in the silence
    # after.
    assert extra["clock_resyncs"] + extra.get("livekit_audio_underruns", 0.0) >= 1, extra
    assert extra.get("livekit_audio_track_renewals", 0.0) >= 1, extra
    for label, median_ms, onset_ms, correlation in results[2:]:
        # The alignment found the utterance (the receiver's jitter buffer time-stretches a little under this
        # load).
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
