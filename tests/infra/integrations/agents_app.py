"""A real livekit-agents `AgentSession` with a lipsync avatar, driven by test_livekit_plugin.py.

Runs in the livekit-agents env (tests/support/framework_venv.py), never in the service's: it
imports only livekit-agents, the plugin and the client. No LLM and no STT: the agent says a
fixed sentence through `EspeakTTS`, a real TTS that synthesizes with espeak-ng.

Protocol with the test: one JSON object per stdout line (`{"event": ...}`); the test answers
on stdin with one word per line: `say`, then `close` (the agent session closes), then `exit`.
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
import wave
from pathlib import Path
from typing import Any

from livekit import rtc
from livekit.agents import Agent, AgentSession, APIConnectOptions, tts, utils
from livekit.agents.voice.room_io import RoomOptions
from livekit.plugins import lipsync

ESPEAK_RATE_HZ = 22_050


def espeak_pcm(text: str) -> tuple[bytes, int]:
    """`text` spoken by espeak-ng: s16le mono PCM and its sample rate."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise RuntimeError("espeak-ng is not installed")
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "speech.wav"
        subprocess.run([binary, "-w", str(path), text], check=True, capture_output=True, timeout=60)
        with wave.open(str(path), "rb") as wav:
            return wav.readframes(wav.getnframes()), wav.getframerate()


class EspeakTTS(tts.TTS):
    def __init__(self) -> None:
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=False), sample_rate=ESPEAK_RATE_HZ, num_channels=1
        )

    def synthesize(self, text: str, *, conn_options: APIConnectOptions | None = None) -> tts.ChunkedStream:
        return _EspeakStream(tts=self, input_text=text, conn_options=conn_options or APIConnectOptions())


class _EspeakStream(tts.ChunkedStream):
    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        pcm, rate_hz = await asyncio.to_thread(espeak_pcm, self.input_text)
        output_emitter.initialize(
            request_id=utils.shortuuid(), sample_rate=rate_hz, num_channels=1, mime_type="audio/pcm"
        )
        chunk = rate_hz // 10 * 2  # 100 ms, as a streaming TTS would deliver it
        for offset in range(0, len(pcm), chunk):
            output_emitter.push(pcm[offset : offset + chunk])
        output_emitter.flush()


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def next_command(reader: asyncio.StreamReader) -> str:
    return (await reader.readline()).decode().strip()


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    room = rtc.Room()
    await room.connect(args.livekit_url, args.token)
    session = AgentSession(tts=EspeakTTS())
    closed = asyncio.Event()
    session.on("close", lambda _event: closed.set())
    avatar = lipsync.AvatarSession(
        args.api_url, args.api_key, avatar=args.avatar_url, join_timeout_s=args.join_timeout_s
    )
    try:
        await avatar.start(session, room=room)
    except lipsync.LipsyncAvatarError as exc:
        emit("avatar_failed", code=exc.code, message=exc.message, session_id=exc.session_id)
        await room.disconnect()
        return
    emit("avatar_joined", session_id=avatar.session_id, avatar_identity=avatar.avatar_identity)
    await session.start(
        agent=Agent(instructions="You only say what you are told to say."),
        room=room,
        room_options=RoomOptions(audio_input=False, text_input=False, close_on_disconnect=False),
    )
    emit("agent_started", local_identity=room.local_participant.identity)

    if await next_command(reader) == "say":
        handle = session.say(args.text)
        await handle.wait_for_playout()
        emit("spoken", interrupted=handle.interrupted)
    if await next_command(reader) == "close":
        await session.aclose()
        await closed.wait()
        emit("agent_session_closed")
    await next_command(reader)  # exit: the test has seen what it waited for
    await room.disconnect()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    parser = argparse.ArgumentParser()
    for name in ("--livekit-url", "--token", "--api-url", "--api-key", "--avatar-url", "--text"):
        parser.add_argument(name, required=True)
    parser.add_argument("--join-timeout-s", type=float, default=90.0)
    asyncio.run(main(parser.parse_args()))
