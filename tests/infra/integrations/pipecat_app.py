"""A real Pipecat pipeline, `EspeakTTSService -> LipsyncVideoService`, driven by test_pipecat.py.

Runs in the Pipecat env (tests/support/framework_venv.py), never in the service's: it imports
only pipecat-ai, the integration and the client. The TTS is real (espeak-ng, in a Pipecat
`TTSService`); the pipeline runs under `PipelineRunner` like any bot.

Protocol with the test: one JSON object per stdout line (`{"event": ...}`); the test answers
on stdin with one word per line: `say`, `drop` (cut the audio connection), `interrupt`, `end`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import wave
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from pipecat.frames.frames import EndFrame, Frame, InterruptionFrame, TTSSpeakFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.workers.runner import WorkerRunner
from pipecat_lipsync import LipsyncVideoService

LONG_TEXT = " ".join(["This sentence is long on purpose, so that it can be cut off in the middle."] * 4)


def espeak_pcm(text: str) -> tuple[bytes, int]:
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise RuntimeError("espeak-ng is not installed")
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "speech.wav"
        subprocess.run([binary, "-w", str(path), text], check=True, capture_output=True, timeout=60)
        with wave.open(str(path), "rb") as wav:
            return wav.readframes(wav.getnframes()), wav.getframerate()


class EspeakTTSService(TTSService):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            push_start_frame=True,
            push_stop_frames=True,
            settings=TTSSettings(model=None, voice=None, language=None),
            **kwargs,
        )

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame, None]:
        pcm, rate_hz = await asyncio.to_thread(espeak_pcm, text)

        async def chunks() -> Any:
            step = rate_hz // 10 * 2  # 100 ms, as a streaming TTS delivers it
            for offset in range(0, len(pcm), step):
                yield pcm[offset : offset + step]

        async for frame in self._stream_audio_frames_from_iterator(
            chunks(), in_sample_rate=rate_hz, context_id=context_id
        ):
            yield frame


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    lipsync = LipsyncVideoService(
        api_url=args.api_url, api_key=args.api_key, avatar=args.avatar_url, room=args.room
    )
    for name in ("on_ready", "on_playback_started", "on_playback_finished", "on_audio_error"):

        def forward(_service: Any, event: dict[str, Any], name: str = name) -> None:
            events.put_nowait((name, event))

        lipsync.add_event_handler(name, forward)

    async def wait_event(name: str) -> dict[str, Any]:
        while True:
            got, event = await events.get()
            if got == "on_audio_error":
                emit("audio_error", **event)
            if got == name:
                return event

    task = PipelineWorker(
        Pipeline([EspeakTTSService(sample_rate=24_000), lipsync]),
        params=PipelineParams(audio_out_sample_rate=24_000),
        idle_timeout_secs=None,
    )
    worker_runner = WorkerRunner(handle_sigint=False)
    await worker_runner.add_workers(task)
    runner = asyncio.create_task(worker_runner.run())
    ready = await wait_event("on_ready")
    assert lipsync.session is not None and lipsync.session.livekit is not None
    emit(
        "ready",
        session_id=lipsync.session.session_id,
        avatar_identity=lipsync.session.livekit.identity,
        ready=ready,
    )

    for command in iter_commands(reader):
        word = await command
        if word == "say":
            await task.queue_frame(TTSSpeakFrame(args.text))
            started = await wait_event("on_playback_started")
            finished = await wait_event("on_playback_finished")
            emit("spoken", started=started, finished=finished)
        elif word == "drop":
            # The audio connection goes away under the processor (as when an API replica restarts);
            # its next send must reconnect and carry on.
            stream = lipsync._audio  # the test reaches in to cut the connection
            assert stream is not None
            await stream.aclose()
            emit("dropped")
        elif word == "interrupt":
            await task.queue_frame(TTSSpeakFrame(LONG_TEXT))
            started = await wait_event("on_playback_started")
            await asyncio.sleep(1.0)
            await task.queue_frame(InterruptionFrame())
            finished = await wait_event("on_playback_finished")
            emit("interrupted", started=started, finished=finished)
        elif word == "end":
            await task.queue_frame(EndFrame())
            await asyncio.wait_for(runner, 60)
            emit("ended")
            return


def iter_commands(reader: asyncio.StreamReader) -> Any:
    while True:
        yield _readline(reader)


async def _readline(reader: asyncio.StreamReader) -> str:
    return (await reader.readline()).decode().strip()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for name in ("--api-url", "--api-key", "--avatar-url", "--room", "--text"):
        parser.add_argument(name, required=True)
    asyncio.run(main(parser.parse_args()))
