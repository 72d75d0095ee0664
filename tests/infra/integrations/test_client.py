"""`lipsync_client` and the `lipsync session` CLI against the real service (tests/support/api_stack.py).

One stack per module: Temporal dev server, livekit-server, control worker, the production
sidecar (preview engine) and the API. A LiveKit subscriber checks that what the client sends
reaches the room.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lipsync_client import (
    ApiError,
    ApiUnreachableError,
    AudioFormat,
    AudioStreamError,
    Avatar,
    LipsyncClient,
    LiveKitOutput,
    SessionFailedError,
    WaitTimeoutError,
)

from infra.demo import speech_pcm
from infra.paths import PROJECT_ROOT
from infra.process import free_port
from tests.support.api_stack import AVATAR_SIDE_PX, ApiStack
from tests.support.avcheck import RoomRecorder

pytestmark = pytest.mark.service

SENTENCE = "Hello there, this is the lip sync client speaking."
RATE_HZ = 16_000
CLIENT_SRC = PROJECT_ROOT / "infra" / "integrations" / "lipsync-client" / "src"


@pytest.fixture
async def client(stack: ApiStack) -> AsyncIterator[LipsyncClient]:
    async with LipsyncClient(stack.api_url, stack.api_key) as api:
        yield api


async def test_a_session_through_the_client(stack: ApiStack, client: LipsyncClient) -> None:
    room = "client-room"
    created = await client.create_session(
        avatar=Avatar(frames_zip_url=stack.avatar_url), livekit=LiveKitOutput(room)
    )
    stack.harness.workflow_ids.append(f"session-{created.session_id}")
    assert created.livekit is not None and created.livekit.room == room
    assert created.livekit.identity == f"avatar-{created.session_id}"
    token = await client.viewer_token(room, identity="client-viewer")
    # Viewer identities live in the viewer- namespace, so a viewer never takes an avatar's or agent's place.
    assert token.room == room and token.identity == "viewer-client-viewer" and token.viewer_url
    viewer = RoomRecorder(mouth_box=(0, 0, AVATAR_SIDE_PX, AVATAR_SIDE_PX))
    await viewer.connect(token.url, token.token)
    pcm = speech_pcm(SENTENCE)
    events: list[dict[str, object]] = []
    try:
        async with client.audio_stream(created) as audio:
            audio.add_listener(events.append)
            ready = await audio.wait_ready()
            assert ready["session_id"] == created.session_id
            live = await client.get_session(created.session_id)
            assert live.phase == "live" and live.output == "livekit" and live.sidecar
            listed = await client.list_sessions(room=room)
            assert created.session_id in {entry.session_id for entry in listed.sessions}
            with pytest.raises(WaitTimeoutError):
                await client.wait_for_phase(created.session_id, {"completed"}, timeout_s=0)

            await audio.stream_pcm(pcm)
            started = await audio.next_event("playback_started")
            finished = await audio.next_event("playback_finished")
            assert finished["interrupted"] is False
            assert abs(float(finished["playback_position"]) - len(pcm) / 2 / RATE_HZ) < 0.05
            assert started["utterance_id"] == finished["utterance_id"] == 1

            # Barge-in through the API: its relay carries this socket, so it can interrupt it.
            await audio.stream_pcm(pcm, realtime=False)
            await audio.next_event("playback_started")
            await client.interrupt(created.session_id)
            cut = await audio.next_event("playback_finished")
            assert cut["interrupted"] is True and float(cut["playback_position"]) < len(pcm) / 2 / RATE_HZ
        await viewer.wait_for(lambda: len(viewer.frames) >= 25 and len(viewer.audio_chunks) >= 50, 30)
        stopped = await client.stop_session(created.session_id, "client test done")
        assert stopped.session_id == created.session_id
        final = await client.wait_for_phase(created.session_id, {"completed"}, timeout_s=30)
    finally:
        await viewer.close()
    assert final.end_reason == "stopped" and final.error is None and final.is_terminal
    assert [e["type"] for e in events].count("playback_finished") == 2
    assert viewer.track_names == {"avatar_video": "video", "avatar_audio": "audio"}
    # Interrupt without an audio connection through the API: a clear 409.
    with pytest.raises(ApiError) as no_audio:
        await client.interrupt(created.session_id)
    assert no_audio.value.status_code == 409 and no_audio.value.code == "no_audio_connection"


async def test_client_errors_carry_the_server_codes(stack: ApiStack, client: LipsyncClient) -> None:
    with pytest.raises(ApiError) as missing:
        await client.get_session("no-such-session")
    assert missing.value.status_code == 404 and missing.value.code == "not_found"

    async with LipsyncClient(stack.api_url, "wrong-key") as wrong:
        with pytest.raises(ApiError) as unauthorized:
            await wrong.list_sessions()
    assert unauthorized.value.status_code == 401

    with pytest.raises(ApiError) as invalid:
        await client.create_session(
            avatar=Avatar(frames_zip_url=stack.avatar_url), livekit=LiveKitOutput("bad room!")
        )
    assert invalid.value.status_code == 422 and invalid.value.code == "validation_error"

    # A session whose avatar cannot be fetched: waiting for it to go live names the failure ...
    missing_avatar = Avatar(frames_zip_url=stack.avatar_url.replace("/astronaut.zip", "/missing.zip"))
    failing = await client.create_session(avatar=missing_avatar, livekit=LiveKitOutput("client-fail-room"))
    stack.harness.workflow_ids.append(f"session-{failing.session_id}")
    with pytest.raises(SessionFailedError) as failed:
        await client.wait_until_live(failing.session_id, timeout_s=60)
    assert failed.value.code == "asset_http_error" and failed.value.phase == "failed"
    # ... and so does its audio WebSocket (the relay's error, then the close).
    async with client.audio_stream(failing) as audio:
        with pytest.raises(AudioStreamError) as refused:
            await audio.wait_ready(30)
    assert refused.value.code == "asset_http_error"

    # The same session id twice: 409.
    with pytest.raises(ApiError) as duplicate:
        await client.create_session(
            avatar=missing_avatar, livekit=LiveKitOutput("client-fail-room"), session_id=failing.session_id
        )
    assert duplicate.value.status_code == 409 and duplicate.value.code == "session_exists"

    # An id that was never started: the relay says so and closes.
    async with client.audio_stream(client.audio_ws_url("never-created")) as audio:
        with pytest.raises(AudioStreamError) as unknown:
            await audio.next_event("playback_finished", timeout_s=30)
    assert unknown.value.code == "not_found", unknown.value

    async with LipsyncClient(f"http://127.0.0.1:{free_port()}", stack.api_key) as nowhere:
        with pytest.raises(ApiUnreachableError):
            await nowhere.get_session("x")


async def test_client_refuses_bad_arguments_before_sending(client: LipsyncClient) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Avatar()
    with pytest.raises(ValueError, match="http"):
        LipsyncClient("ftp://example.com", "key")
    with pytest.raises(ValueError, match="api_key"):
        LipsyncClient("http://example.com", "")
    with pytest.raises(ValueError, match="give livekit"):
        await client.create_session(avatar=Avatar(frames_zip_url="https://example.com/a.zip"))
    with pytest.raises(ValueError, match="ws"):
        client.audio_stream("http://example.com/audio")
    stream = client.audio_stream("ws://127.0.0.1:1/audio", audio_format=AudioFormat(channels=2))
    with pytest.raises(ValueError, match="whole number"):
        await stream.send_pcm(b"\x00\x00")  # one sample of two channels
    assert client.audio_ws_url("a/b").endswith("/v1/sessions/a%2Fb/audio")


async def _cli(stack: ApiStack | None, *args: str, api_key: str | None = None) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), str(CLIENT_SRC)])}
    env.pop("LIPSYNC_API_KEY", None)
    prefix = ["--api-url", stack.api_url] if stack else []
    key = stack.api_key if api_key is None and stack else api_key
    prefix += ["--api-key", key] if key else []
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "infra.cli", "session", *prefix, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=PROJECT_ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode is not None
    # stderr's last line is the command's own verdict (log lines come before it)
    lines = err.decode().strip().splitlines()
    return process.returncode, out.decode(), lines[-1] if lines else ""


async def test_the_session_cli(stack: ApiStack, tmp_path: Path) -> None:
    wav_path = tmp_path / "speech.wav"
    pcm = speech_pcm("The command line streams this file.", rate_hz=24_000)
    with wave.open(str(wav_path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(24_000)
        wav.writeframes(pcm)

    rc, out, err = await _cli(
        stack, "start", "--frames-zip-url", stack.avatar_url, "--room", "cli-room", "--wait-live"
    )
    assert rc == 0, err
    started = json.loads(out)
    session_id = started["session_id"]
    stack.harness.workflow_ids.append(f"session-{session_id}")
    assert started["status"]["phase"] == "live" and started["livekit"]["identity"] == f"avatar-{session_id}"

    rc, out, err = await _cli(
        stack, "stream", session_id, str(wav_path), "--audio-ws-url", started["audio_ws_url"]
    )
    assert rc == 0, err
    lines = out.splitlines()
    events = [json.loads(line)["event"] for line in lines if line.startswith('{"event"')]
    assert [e["type"] for e in events][:1] == ["ready"]
    result = json.loads("\n".join(line for line in lines if not line.startswith('{"event"')))
    assert result["playback_finished"]["interrupted"] is False
    assert abs(result["playback_finished"]["playback_position"] - len(pcm) / 2 / 24_000) < 0.05

    rc, out, err = await _cli(stack, "stream", session_id, str(wav_path), "--fast")  # the URL found by itself
    assert rc == 0, err

    rc, out, err = await _cli(stack, "status", session_id)
    assert rc == 0, err
    status = json.loads(out)
    assert status["phase"] == "live" and status["stats"]["audio_samples_received"] > 0

    rc, out, err = await _cli(stack, "stop", session_id)
    assert rc == 0, err
    assert json.loads(out)["session_id"] == session_id

    # Errors: the server's code on stderr and exit 1; usage errors exit 2 before any request.
    rc, _, err = await _cli(stack, "status", "no-such-session")
    assert rc == 1 and err.startswith("error: not_found:"), err
    rc, _, err = await _cli(stack, "status", session_id, api_key="wrong")
    assert rc == 1 and err.startswith("error: unauthorized:"), err
    rc, _, err = await _cli(None, "status", session_id)
    assert rc == 2 and "no API key" in err, err
    rc, _, err = await _cli(stack, "start", "--frames-zip-url", stack.avatar_url)
    assert rc == 2 and "--room" in err, err
    not_wav = tmp_path / "not.wav"
    not_wav.write_bytes(b"RIFF nonsense")
    rc, _, err = await _cli(stack, "stream", session_id, str(not_wav))
    assert rc == 2 and "not a readable PCM WAV" in err, err
