"""Stress, end to end: lip sync through process stalls while a CPU hog shares the sidecar's core.

A real sidecar process (`lipsync sidecar --no-temporal`, preview engine, the product's defaults) publishes
into a real livekit-server; a real subscriber (`livekit.rtc`, this process) records what it receives, with
its receive statistics. The placement models a deployment on one 2-core host: the sidecar and a CPU hog
(a noisy neighbour spinning the whole time) share core 0; the subscriber and livekit-server, which stand
in for other machines, run on core 1 (`peers_off_sidecar_core`). The sidecar has priority over the hog as
docs/production.md asks of a deployment (systemd `Nice=-5` or a higher `CPUWeight=` than its neighbours):
here the hog runs at nice 5, the same CPU weight ratio without privileges. After one utterance before any
stall, and more until the subscriber has received the audio for `MATURE_RECEIVER_S` (a viewer that has
been watching a while: see below), the sidecar is SIGSTOPped for 250 ms twice — once in the middle of an
utterance, once while idle — and the utterances after each stall are measured.

The sidecar's own clock (its session stats, read before and after every utterance), with these tolerances:

- send-side A/V offset (when a frame entered WebRTC, less the deliberate video delay, minus when its audio
  did): within two frames (80 ms) for at least 90 % of each utterance's frames after a stall, plus, in the
  utterance the stall hit, the frames the stall itself caught (`STALL_FRAMES`). Two frames, not one: in
  speech the sidecar keeps audio up to two frames late until the next silence rather than drop words
  (docs/audio-protocol.md §4);
- the stall in speech was seen on the sidecar's clock (it restarted, or the re-anchoring dropped late
  audio), and the stall in silence cost the audio source no pull (its RTP clock stayed in step with real
  time); sample accounting exact;
- `playback_finished` left no earlier than `FINISHED_TOLERANCE_MS` before the sidecar's own account of
  when the utterance's last speech sample is heard, and no later than that plus the lateness its own
  clock measured for its ticks (p99): with the hog the event loop runs late, and the event's timer with it.

The subscriber (method of docs/audio-protocol.md §4.1): every utterance after a stall is heard (at least
half as many audible 10 ms windows as the speech has); its A/V offset (median over its frames) less what the
subscriber's own jitter buffers changed since the utterance before any stall (audio buffer growth makes the
audio late, video buffer growth the video) is within `MAX_STREAM_OFFSET_MS`; and the offset itself of the
utterance after the stall in speech is within `MAX_OFFSET_MS`. The first bound is on the stream's own
offset: a sender that lets audio and video slip apart (as before the re-anchoring: −415 ms after one stall,
growing) fails it, whatever the subscriber's buffers do; its tolerance is two frames because the buffers'
delays are means over an utterance in which they move by up to ≈ 100 ms. The second is what the viewer sees.
Issue 18 asks ≤ 40 ms of it for every utterance after the stall; the bound is two frames because after a
stall in speech the subscriber's synchroniser, which follows the audio buffer with the video only gradually
and rests within ±30 ms of its target, held the video +30 and +37 ms late (two runs) once the audio was back
(docs/audio-protocol.md §4 has the measurements). That holds only for a viewer that has been receiving for a
while, hence `MATURE_RECEIVER_S`: after a SIGSTOP in speech, the SDK's audio pacer sends the whole stall's
audio in one burst when the process resumes (12–13 packets, up to 250 ms late, before the sidecar's code
runs again), and a subscriber's NetEq in its first ≈ 20 s raises its target delay on that burst to ≈ 260 ms
for ≈ 6 s (the next utterance read −189/−195 ms, the one after +71 ms: `bench/stall_neteq.py`), while an
older one keeps its target and plays the excess off at the next silence. After the stall in silence the
offset is printed, not bounded: a stall that holds up Opus' DTX refresh (two packets every 400 ms of
silence) sends it 60–106 ms late, and the subscriber's NetEq anchors its comfort noise, and so the next
utterance, on it: that utterance plays that much later, its excess accelerated away only after ≈ 2 s, and
such stalls add up in its statistics (−72 and −83 ms after the fourth within 30 s in
`bench/stall_neteq.py`). No sender can prevent either late send (the whole process was stopped). The
utterance the stall hit is not bounded: its own audio and video lose the stall.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets

from infra.livekit import LiveKitServerConfig
from infra.process import ManagedProcess, pin_threads, restore_threads
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

pytestmark = [pytest.mark.service]

SENTENCES = (
    "The rain in Spain stays mainly in the plain, said the professor.",
    "Seven silver swans swam silently southward before sunrise.",
    "Please bring the blue book and the red pen to the meeting room.",
    "A quick test of lips and voice after the stall has passed.",
)
STALL_S = 0.25
# Send side (the sidecar's clock).
FRAME_MS = 40.0
MIN_IN_STEP_FRACTION = 0.9  # of an utterance's frames within two frames
STALL_FRAMES = 4  # frames a 250 ms stop catches between 40 and 120 ms late (later ones are dropped)
FINISHED_TOLERANCE_MS = 60.0
PULL_NOISE_MS = 50.0  # two readings of the audio source's pulled count, each up to a pull plus jitter
# Subscriber (this process, on the same loaded host).
MIN_HEARD_FRACTION = 0.5  # audible 10 ms windows received / in the speech sent
AUDIBLE_PEAK = 0.02  # -34 dBFS: speech; silence and Opus' comfort noise stay far below
MAX_STREAM_OFFSET_MS = 80.0  # two frames: see the module docstring
MAX_OFFSET_MS = 80.0  # two frames: see the module docstring
# The subscriber has received the audio this long before the first stall: its NetEq's delay statistics no
# longer let one late burst lift its target (they weigh a new sample by more than 5 % for about 20 s).
MATURE_RECEIVER_S = 30.0
HOG_NICE = 5  # the sidecar ranks above its neighbour (docs/production.md); unprivileged: the hog is niced
READER_CATCH_UP_S = 3.0
PEERS_CORE = 1  # the subscriber's and livekit-server's core; the sidecar and the hog share core 0


@pytest.fixture
async def sidecar_process(
    tmp_path: Path, livekit_server: LiveKitServerConfig, avatar_zip_path: Path
) -> AsyncIterator[SidecarChild]:
    async with sidecar_child(tmp_path, livekit_server, avatar_zip_path.parent, pinned=True) as child:
        yield child


@pytest.fixture
def cpu_hog() -> Any:
    """A process that spins on the sidecar's core for the whole test, ranked below the sidecar."""
    hog = subprocess.Popen(
        ["nice", "-n", str(HOG_NICE), *on_core_0([sys.executable, "-c", "while True: pass"])]
    )
    try:
        yield hog
    finally:
        hog.kill()
        hog.wait(timeout=5)


@pytest.fixture
def peers_off_sidecar_core(
    livekit_service: tuple[LiveKitServerConfig, ManagedProcess],
) -> Iterator[None]:
    """The subscriber (this process) and livekit-server on core 1 for the test: in a deployment they are
    other machines, which the sidecar host's load does not starve (the hog shares core 0 with the sidecar
    only). Their previous cores are restored afterwards."""
    if (os.cpu_count() or 1) < 2:
        pytest.fail("the stress test needs two cores: the sidecar's (with the hog) and its peers'")
    server_pid = livekit_service[1].pid
    assert server_pid is not None
    pinned = [(pid, pin_threads(pid, {PEERS_CORE})) for pid in (os.getpid(), server_pid)]
    try:
        yield
    finally:
        for pid, previous in pinned:
            restore_threads(pid, previous)


@pytest.fixture(scope="module")
def sentences(tmp_path_factory: pytest.TempPathFactory) -> list[SpeechClip]:
    return [espeak(tmp_path_factory.mktemp(f"s{index}"), text) for index, text in enumerate(SENTENCES)]


@dataclass
class Utterance:
    clip: SpeechClip
    start_frame_id: int
    sent_at_s: float
    label: str
    before: dict[str, float]  # the sidecar's stats `extra` before and after it
    after: dict[str, float]

    def delta(self, key: str) -> float:
        return self.after.get(key, 0.0) - self.before.get(key, 0.0)


def audible_windows(samples: np.ndarray) -> int:
    """10 ms windows (at 48 kHz) whose peak is speech."""
    windows = samples[: len(samples) // 480 * 480].reshape(-1, 480)
    return int(np.count_nonzero(np.abs(windows).max(axis=1) >= AUDIBLE_PEAK)) if len(windows) else 0


def measure(recorder: RoomRecorder, utterance: Utterance) -> tuple[float | None, float | None, float, float]:
    """(median offset, onset offset, envelope r, heard fraction) at the subscriber; the received audio is
    searched only around the utterance. The offsets are None when the subscriber lost every frame around
    the speech onset (its decoder queue overflows under load)."""
    sent48 = utterance.clip.at_48k()
    arrivals = np.array([arrival for arrival, _ in recorder.audio_chunks])
    starts = np.cumsum([0] + [len(chunk) for _, chunk in recorder.audio_chunks])
    first = int(np.searchsorted(arrivals, utterance.sent_at_s - 0.5))
    last = int(np.searchsorted(arrivals, utterance.sent_at_s + utterance.clip.duration_s + 2.0))
    received = recorder.audio()
    window = received[starts[first] : starts[last]]
    lag, _ = align(window, sent48)
    correlation = envelope_correlation(window, sent48, lag)
    heard = audible_windows(window) / max(1, audible_windows(sent48))
    try:
        offset = av_offset(
            recorder, int(starts[first]) + lag, utterance.start_frame_id, len(sent48), speech_onset(sent48)
        )
    except KeyError:
        return None, None, correlation, heard
    return offset.median_ms, offset.onset_ms, correlation, heard


async def speak(
    sidecar: SidecarChild,
    session_id: str,
    ws: websockets.ClientConnection,
    clip: SpeechClip,
    *,
    label: str,
    stall: Any = None,
) -> Utterance:
    before = (await sidecar.stats(session_id))["extra"]
    sent_at_s = time.monotonic()
    sender = asyncio.create_task(stream_realtime(ws, clip))
    if stall is not None:
        await asyncio.sleep(clip.duration_s / 2)
        await asyncio.to_thread(stall)  # off this loop: the subscriber keeps recording arrival times
    await sender
    await ws.send(json.dumps({"type": "end_of_utterance"}))
    started = await next_of(ws, "playback_started")
    await next_of(ws, "playback_finished")
    after = (await sidecar.stats(session_id))["extra"]
    return Utterance(clip, int(started["frame_id"]), sent_at_s, label, before, after)


@pytest.mark.usefixtures("peers_off_sidecar_core")
async def test_lip_sync_holds_through_process_stalls_and_a_cpu_hog(
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

    def stall() -> None:
        sidecar_process.stall(STALL_S)

    try:
        await recorder.wait_for(lambda: len(recorder.frames) >= 25 and len(recorder.audio_chunks) >= 50, 20)
        subscribed_at_s = time.monotonic()
        async with websockets.connect(sidecar_process.audio_url(session_id, sentences[0].rate_hz)) as ws:
            await next_of(ws, "ready")

            async def say(index: int, label: str, stall: Any = None) -> None:
                utterances.append(
                    await speak(sidecar_process, session_id, ws, sentences[index], label=label, stall=stall)
                )

            await say(3, "before any stall")
            filler = 0
            while time.monotonic() - subscribed_at_s < MATURE_RECEIVER_S:  # not measured
                await asyncio.sleep(0.3)
                await speak(sidecar_process, session_id, ws, sentences[filler % 4], label="filler")
                filler += 1
            await asyncio.sleep(0.5)
            await say(0, "stalled mid-utterance", stall=stall)
            await asyncio.sleep(0.5)
            await say(1, "after a stall mid-utterance")
            await asyncio.sleep(0.5)
            idle_before = (await sidecar_process.stats(session_id))["extra"]
            await asyncio.to_thread(stall)  # while idle
            await asyncio.sleep(0.5)
            idle_after = (await sidecar_process.stats(session_id))["extra"]
            await say(2, "after a stall while idle")
            await asyncio.sleep(0.3)
            await say(3, "second after the idle stall")
        # Silence keeps arriving meanwhile: a reader the load starved catches up on it, and the play times
        # of the audio it queued before are undone from that (tests/support/avcheck.py).
        await asyncio.sleep(READER_CATCH_UP_S)
        stats = await sidecar_process.stats(session_id)
    finally:
        await recorder.close()
        await sidecar_process.close_session(session_id)

    # ---- what the subscriber saw: printed; bounded below ---------------------------------------------
    subscriber = []
    buffers_ms: list[tuple[float | None, float | None]] = []  # per utterance: audio, video jitter buffer
    measured = [measure(recorder, utterance) for utterance in utterances]
    for utterance, (median_ms, onset_ms, correlation, heard) in zip(utterances, measured, strict=True):
        until_s = utterance.sent_at_s + utterance.clip.duration_s + 0.5
        jitter_ms = [
            mean_jitter_delay_ms(recorder.jitter, kind, utterance.sent_at_s, until_s)
            for kind in ("audio", "video")
        ]
        buffers_ms.append((jitter_ms[0], jitter_ms[1]))
        subscriber.append(
            (
                utterance.label,
                None if median_ms is None else round(median_ms, 1),
                None if onset_ms is None else round(onset_ms, 1),
                round(correlation, 3),
                round(heard, 2),
                *(None if value is None else round(value, 1) for value in jitter_ms),
            )
        )
    send_side = [
        (
            u.label,
            int(u.delta("livekit_av_offset_frames")),
            int(u.delta("livekit_av_offset_alarms")),
            int(u.delta("livekit_av_offset_frames_past_late_speech")),
            u.after.get("playback_finished_error_ms_last"),
            round(u.delta("livekit_audio_pulls_missed_ms"), 1),
        )
        for u in utterances
    ]
    extra = stats["extra"]
    idle_missed_ms = idle_after.get("livekit_audio_pulls_missed_ms", 0.0) - idle_before.get(
        "livekit_audio_pulls_missed_ms", 0.0
    )
    print(
        "\nsubscriber (label, A/V offset median, onset ms, envelope r, heard, jitter buffer audio, video "
        "ms):",
        subscriber,
        "\nsidecar (label, frames, frames past 40 ms, past 80 ms, playback_finished error ms, pulls missed "
        "ms):",
        send_side,
        f"\nsidecar lateness p99 {stats['lateness_ms_p99']}, idle stall: pulls missed "
        f"{idle_missed_ms:.1f} ms",
        {key: value for key, value in extra.items() if key.startswith("livekit_audio_")},
    )

    # ---- the sidecar's own clock ----------------------------------------------------------------------
    # The sidecar's clock saw the stall in speech: it restarted from now (a stall past `resync_after_ms`), or
    # the publisher's re-anchoring dropped the audio that came too late.
    stalled = utterances[1]
    seen = stalled.delta("clock_resyncs") + stalled.delta("livekit_audio_resync_dropped")
    assert seen >= 1, send_side
    for utterance in utterances[1:]:
        frames = utterance.delta("livekit_av_offset_frames")
        assert frames >= 0.5 * utterance.clip.duration_s * 1000.0 / FRAME_MS, send_side
        allowed = (1.0 - MIN_IN_STEP_FRACTION) * frames + (STALL_FRAMES if utterance is stalled else 0)
        assert utterance.delta("livekit_av_offset_frames_past_late_speech") <= allowed, send_side
        error_ms = utterance.after["playback_finished_error_ms_last"]
        loop_late_ms = stats["lateness_ms_p99"] or 0.0
        assert -FINISHED_TOLERANCE_MS <= error_ms <= FINISHED_TOLERANCE_MS + loop_late_ms, (
            loop_late_ms,
            send_side,
        )
    # The stall in silence cost no pull: the sender's RTP clock stayed in step with real time.
    assert idle_missed_ms <= PULL_NOISE_MS, (idle_missed_ms, idle_before, idle_after)
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

    # ---- the subscriber, within what holds on a loaded host -----------------------------------------
    for _median_ms, _onset_ms, _r, heard in measured[2:]:
        assert heard >= MIN_HEARD_FRACTION, subscriber
    # The stream's own offset: the subscriber's jitter-buffer changes since before any stall taken out.
    (base_audio_ms, base_video_ms) = buffers_ms[0]
    assert base_audio_ms is not None and base_video_ms is not None, subscriber
    stream_offsets_ms = []
    for (median_ms, *_), (audio_ms, video_ms) in zip(measured[2:], buffers_ms[2:], strict=True):
        if median_ms is None or audio_ms is None or video_ms is None:
            continue
        stream_offsets_ms.append(
            round(median_ms + (audio_ms - base_audio_ms) - (video_ms - base_video_ms), 1)
        )
    print("stream offsets after the stalls (ms):", stream_offsets_ms)
    assert stream_offsets_ms, subscriber
    assert max(abs(value) for value in stream_offsets_ms) <= MAX_STREAM_OFFSET_MS, (
        stream_offsets_ms,
        subscriber,
    )
    offsets_ms = [median_ms for median_ms, *_ in measured[2:] if median_ms is not None]
    assert len(offsets_ms) >= 2, subscriber  # a lost onset frame or two, not the whole video
    # What the viewer sees after the stall in speech.
    after_speech_stall_ms = measured[2][0]
    assert after_speech_stall_ms is not None and abs(after_speech_stall_ms) <= MAX_OFFSET_MS, subscriber
