"""A subscriber lip-syncs the tracks a participant publishes in one `stream` (livekit-server's
`room.sync_streams`, which infra/livekit.py turns on).

Two publisher processes send a tone and a picture; one puts both tracks in one stream, the other in
two. Each is stopped (SIGSTOP) for `STALL_S` every `STALL_EVERY_S`, as a stalled sidecar is: its
audio then reaches the subscriber late and the subscriber's audio jitter buffer (NetEq) grows, while
the video's does not. A libwebrtc subscriber (the native SDK here, browsers alike) that syncs the
tracks of one stream then holds that stream's video back to the deeper audio; tracks of different
streams are not synced and their video keeps its own short delay. Without `sync_streams`
livekit-server gives every track its own stream id and neither video would follow its audio.
libwebrtc's synchroniser needs two sender reports per track (livekit-server sends them every 3 s) and
then moves about an eighth of the remaining difference per second, so the test waits up to
`TIMEOUT_S` for the synced video's delay to reach `SYNCED_VIDEO_MIN_MS` and twice the unsynced
video's. (Measured: the audio buffers grew to 260 ms, the synced video's to 115-150 ms after 10-12 s,
the unsynced video's stayed at 9-12 ms.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from infra.livekit import LiveKitServerConfig
from tests.support.avcheck import RoomRecorder, mean_jitter_delay_ms, token

pytestmark = pytest.mark.service

STALL_S = 0.25
STALL_EVERY_S = 3.0
TIMEOUT_S = 40.0
READ_EVERY_S = 1.0
WINDOW_S = 2.0  # jitter-buffer delays are means over the last window
# The synced video's delay must reach this, and twice the unsynced video's (which a loaded host can grow
# on its own): without sync both stay at their own jitter target (10-20 ms measured; 40-85 ms under load).
SYNCED_VIDEO_MIN_MS = 80.0


class Publisher:
    """A tone publisher process (tests/support/tone_publisher.py) that the test can stop and resume."""

    def __init__(self, livekit_server: LiveKitServerConfig, room: str, audio_stream: str, video_stream: str):
        argv = [
            sys.executable, "-m", "tests.support.tone_publisher", livekit_server.ws_url,
            token(livekit_server, "publisher", room), audio_stream, video_stream,
        ]  # fmt: skip
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE)

    async def wait_published(self, timeout_s: float = 30.0) -> None:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.process.stdout.readline), timeout_s)
        assert line.strip() == b"published", f"publisher exited with {self.process.poll()}: {line!r}"

    def signal(self, signum: signal.Signals) -> None:
        os.kill(self.process.pid, signum)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.signal(signal.SIGCONT)
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


async def test_a_subscriber_holds_the_video_of_a_stream_to_its_late_audio(
    livekit_server: LiveKitServerConfig,
) -> None:
    streams = {"synced": ("avatar", "avatar"), "unsynced": ("voice", "picture")}
    publishers: dict[str, Publisher] = {}
    recorders: dict[str, RoomRecorder] = {}
    try:
        for name, (audio_stream, video_stream) in streams.items():
            room = f"stream-sync-{name}"
            publishers[name] = Publisher(livekit_server, room, audio_stream, video_stream)
            await publishers[name].wait_published()
            recorders[name] = RoomRecorder(mouth_box=(0, 0, 8, 8), stats_interval_s=0.5)
            await recorders[name].connect(livekit_server.ws_url, token(livekit_server, "viewer", room))

        def delays_ms(name: str) -> tuple[float, float] | None:
            """The subscriber's mean audio and video jitter-buffer delays over the last window."""
            now = time.monotonic()
            jitter = recorders[name].jitter
            audio_ms = mean_jitter_delay_ms(jitter, "audio", now - WINDOW_S, now)
            video_ms = mean_jitter_delay_ms(jitter, "video", now - WINDOW_S, now)
            return None if audio_ms is None or video_ms is None else (round(audio_ms, 1), round(video_ms, 1))

        readings: list[dict[str, tuple[float, float] | None]] = []
        started_s = time.monotonic()
        stalls = 0
        while time.monotonic() < started_s + TIMEOUT_S:
            if time.monotonic() >= started_s + 1.0 + stalls * STALL_EVERY_S:
                for publisher in publishers.values():
                    publisher.signal(signal.SIGSTOP)
                await asyncio.sleep(STALL_S)
                for publisher in publishers.values():
                    publisher.signal(signal.SIGCONT)
                stalls += 1
            await asyncio.sleep(READ_EVERY_S)
            readings.append({name: delays_ms(name) for name in streams})
            synced, unsynced = readings[-1]["synced"], readings[-1]["unsynced"]
            if (
                synced is not None
                and unsynced is not None
                and synced[1] >= max(SYNCED_VIDEO_MIN_MS, 2 * unsynced[1])
            ):
                break
        else:
            raise AssertionError(
                f"the video of the synced stream did not follow its audio within {TIMEOUT_S:.0f} s "
                f"(mean (audio, video) jitter-buffer delays, ms, every {READ_EVERY_S:.0f} s: {readings})"
            )
        for recorder in recorders.values():
            assert recorder.frames and recorder.audio_chunks
    finally:
        for recorder in recorders.values():
            await recorder.close()
        for publisher in publishers.values():
            publisher.stop()
