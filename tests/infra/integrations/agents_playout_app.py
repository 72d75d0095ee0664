"""livekit-agents' own `DataStreamAudioOutput` speaking to a lipsync avatar, driven by test_agents_playout.py.

Runs in the livekit-agents env (tests/support/framework_venv.py), never in the service's: it imports
only livekit-agents. It is what an `AgentSession` does with its audio when an avatar speaks for it
(`session.output.audio = DataStreamAudioOutput(...)`), without an LLM or a TTS service: the speech
is espeak-ng's, pushed as a streaming TTS delivers it (100 ms frames, faster than real time).

Times are `time.monotonic()`: CLOCK_MONOTONIC, one clock for every process on the host, so the
test compares them with its subscriber's arrival times directly.

Protocol with the test: one JSON object per stdout line (`{"event": ...}`); commands on stdin,
one per line: `say`, `interrupt <seconds after playback started>`, `exit`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path
from typing import Any

from livekit import rtc
from livekit.agents.voice.avatar import DataStreamAudioOutput
from livekit.agents.voice.io import PlaybackFinishedEvent, PlaybackStartedEvent

FRAME_MS = 100  # a streaming TTS's chunk
AUDIBLE = round(0.02 * 32768)  # the test's threshold for an audible sample (-34 dBFS)


def espeak_pcm(text: str) -> tuple[bytes, int]:
    """`text` spoken by espeak-ng, without the silence it puts around speech (a streaming TTS sends
    little)."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise RuntimeError("espeak-ng is not installed")
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "speech.wav"
        subprocess.run([binary, "-w", str(path), text], check=True, capture_output=True, timeout=60)
        with wave.open(str(path), "rb") as wav:
            pcm, rate_hz = wav.readframes(wav.getnframes()), wav.getframerate()
    samples = memoryview(pcm).cast("h")
    loud = [index for index, value in enumerate(samples) if abs(value) >= AUDIBLE]
    margin = rate_hz // 100  # 10 ms either side of the first and last audible sample
    first, last = max(0, loud[0] - margin), min(len(samples), loud[-1] + 1 + margin)
    return pcm[2 * first : 2 * last], rate_hz


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class Speaker:
    """One `DataStreamAudioOutput` to the avatar, and the times its playback events arrived."""

    def __init__(self, room: rtc.Room, avatar_identity: str) -> None:
        self.output = DataStreamAudioOutput(
            room, destination_identity=avatar_identity, wait_remote_track=rtc.TrackKind.KIND_VIDEO
        )
        self.started = asyncio.Event()
        self.started_at_s = 0.0
        self.finished: asyncio.Queue[tuple[float, PlaybackFinishedEvent]] = asyncio.Queue()
        self.output.on("playback_started", self._on_started)
        self.output.on("playback_finished", self._on_finished)

    def _on_started(self, _event: PlaybackStartedEvent) -> None:
        self.started_at_s = time.monotonic()
        self.started.set()

    def _on_finished(self, event: PlaybackFinishedEvent) -> None:
        self.finished.put_nowait((time.monotonic(), event))

    async def push(self, pcm: bytes, rate_hz: int) -> None:
        """The speech as one segment (`flush` ends it), 100 ms frames at twice real time."""
        self.started.clear()
        step = rate_hz * FRAME_MS // 1000 * 2
        for offset in range(0, len(pcm), step):
            chunk = pcm[offset : offset + step]
            await self.output.capture_frame(rtc.AudioFrame(chunk, rate_hz, 1, len(chunk) // 2))
            await asyncio.sleep(FRAME_MS / 2000)
        self.output.flush()


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    room = rtc.Room()
    await room.connect(args.livekit_url, args.token)
    speaker = Speaker(room, args.avatar_identity)
    pcm, rate_hz = await asyncio.to_thread(espeak_pcm, args.text)
    emit("ready", identity=room.local_participant.identity, speech_s=len(pcm) / 2 / rate_hz)
    while command := (await reader.readline()).decode().split():
        if command[0] == "say":
            pushed_at_s = time.monotonic()
            await speaker.push(pcm, rate_hz)
            finished_at_s, finished = await asyncio.wait_for(speaker.finished.get(), 60)
            emit(
                "finished",
                pushed_at_s=pushed_at_s,
                started_at_s=speaker.started_at_s,
                finished_at_s=finished_at_s,
                position_s=finished.playback_position,
                interrupted=finished.interrupted,
            )
        elif command[0] == "interrupt":
            pusher = asyncio.create_task(speaker.push(pcm, rate_hz))
            await asyncio.wait_for(speaker.started.wait(), 60)
            await asyncio.sleep(float(command[1]))
            # What an AgentSession does when the user interrupts: stop forwarding speech, clear the avatar's
            # buffer.
            pusher.cancel()
            await asyncio.gather(pusher, return_exceptions=True)
            cleared_at_s = time.monotonic()
            speaker.output.clear_buffer()
            speaker.output.flush()
            finished_at_s, finished = await asyncio.wait_for(speaker.finished.get(), 60)
            emit(
                "cleared",
                cleared_at_s=cleared_at_s,
                started_at_s=speaker.started_at_s,
                finished_at_s=finished_at_s,
                position_s=finished.playback_position,
                interrupted=finished.interrupted,
            )
        else:
            break
    await room.disconnect()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    parser = argparse.ArgumentParser()
    for name in ("--livekit-url", "--token", "--avatar-identity", "--text"):
        parser.add_argument(name, required=True)
    asyncio.run(main(parser.parse_args()))
