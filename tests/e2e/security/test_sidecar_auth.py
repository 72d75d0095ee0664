"""Finding 1: a sidecar's port needs a credential.

A real `lipsync sidecar` process serves a Temporal-run session into the real livekit-server; a
caller without the service credential (or with an audio token of another session, an expired or
forged one) tries what an attacker on the sidecar's port would: list sessions, read stats, take
over the audio socket, stop the session, use the dev control API. Every try is refused with its
code, nothing about the session leaks, and the legitimate client and the session go on.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from infra.livekit import LiveKitServerConfig
from realtime.outputs.registry import LiveKitParams
from realtime.sidecar.auth import check_audio_token
from realtime.sidecar.auth import mint_audio_token as sidecar_mint
from realtime.sidecar.config import ServerConfig
from realtime.sidecar.host import SidecarHost
from realtime.sidecar.server import create_app
from tests.support.credentials import SIDECAR_SECRET, audio_token, service_headers
from tests.support.fake_engine import NoEngine
from tests.support.outputs import output_request
from tests.support.sidecar_process import SidecarProcesses
from tests.support.temporal_harness import Harness, in_phase, wait_for_status
from workflows.client import session_status, stop_session
from workflows.contracts import (
    EndReason,
    Phase,
)
from workflows.sidecar_tokens import audio_token_valid
from workflows.sidecar_tokens import mint_audio_token as api_mint

pytestmark = pytest.mark.service

OTHER_SECRET = "f" * 64


async def recv_json(ws: Any, timeout_s: float = 10.0) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout_s))
    return message


async def refused_audio(url: str, headers: dict[str, str] | None = None) -> tuple[dict[str, Any], int | None]:
    """Connect, read the one message the sidecar sends, and wait for its close: (message, close code)."""
    async with websockets.connect(url, additional_headers=headers) as ws:
        message = await recv_json(ws)
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    return message, ws.close_code


async def test_an_unauthenticated_caller_gets_nothing_from_a_live_sidecar(
    harness: Harness, sidecars: SidecarProcesses, livekit_server: LiveKitServerConfig, avatar_url: str
) -> None:
    await sidecars.spawn("gpu0")
    request = harness.request(
        avatar_url, output_request(livekit=LiveKitParams(url=livekit_server.ws_url, identity="avatar-sec"))
    )
    handle = await harness.start(request)
    await wait_for_status(handle, in_phase(Phase.LIVE), timeout_s=60)
    session_id = request.session_id
    base = f"http://127.0.0.1:{sidecars.ports['gpu0']}"
    ws_base = "ws" + base.removeprefix("http")
    audio = f"{ws_base}/v1/sessions/{session_id}/audio"

    # The legitimate client: the audio token the API would hand out.
    async with websockets.connect(f"{audio}?token={audio_token(session_id)}") as client:
        assert (await recv_json(client))["type"] == "ready"
        async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=10) as anonymous:
            # The bare liveness probe answers, and says nothing else.
            health = await anonymous.get("/healthz")
            assert health.status_code == 200 and health.json() == {"status": "ok"}
            attempts = [
                ("GET", f"/v1/sessions/{session_id}/stats", None),
                ("DELETE", f"/v1/sessions/{session_id}", None),
                ("POST", f"/v1/sessions/{session_id}", {"avatar_path": "/etc/passwd"}),
                ("GET", "/openapi.json", None),
                ("GET", "/no/such/route", None),
            ]
            for credential in (
                {},
                {"Authorization": "Bearer wrong"},
                {
                    "Authorization": f"Bearer {audio_token(session_id)}"
                },  # an audio token is no service credential
                {"Authorization": SIDECAR_SECRET},  # not a bearer
            ):
                for method, path, body in attempts:
                    response = await anonymous.request(method, path, json=body, headers=credential)
                    assert response.status_code == 401, (method, path, credential, response.text)
                    assert response.json()["code"] == "unauthorized"
                    assert session_id not in response.text and "127.0.0.1" not in response.text
            # With the credential, the dev control API is still off (it was not enabled): no stop, no open.
            service = service_headers()
            assert (await anonymous.delete(f"/v1/sessions/{session_id}", headers=service)).status_code in (
                404,
                405,
            )
            started = await anonymous.post(
                "/v1/sessions/x", json={"avatar_path": "/etc/passwd"}, headers=service
            )
            assert started.status_code in (404, 405)

        # Taking over the audio socket: no token, another session's, an expired one, a forged one, the seed
        # address.
        expired = sidecar_mint(SIDECAR_SECRET, session_id, int(time.time()) - 1)
        forged = sidecar_mint(OTHER_SECRET, session_id, int(time.time()) + 600)
        for url in (
            audio,
            f"{audio}?token={audio_token('another-session')}",
            f"{audio}?token={expired}",
            f"{audio}?token={forged}",
            f"{audio}?token=garbage",
            f"{ws_base}/audio?session_id={session_id}",
            f"{ws_base}/audio?session_id={session_id}&token={audio_token('another-session')}",
        ):
            message, close_code = await refused_audio(url)
            assert message["type"] == "error" and message["code"] == "unauthorized", (url, message)
            assert close_code == 1008
        message, _ = await refused_audio(audio, {"Authorization": "Bearer wrong"})
        assert message["code"] == "unauthorized"
        # An unknown session answers the same as a live one: no existence oracle without a credential.
        message, _ = await refused_audio(f"{ws_base}/v1/sessions/no-such-session/audio")
        assert message["code"] == "unauthorized"

        # The real client was never replaced: its speech still plays.
        await client.send(b"\x00\x10" * 8000)
        await client.send(json.dumps({"type": "end_of_utterance"}))
        while (event := await recv_json(client, 20))["type"] != "playback_finished":
            assert event["type"] != "error", event

    # The session is still live and hosted; the service credential still sees everything.
    assert (await session_status(harness.client, session_id)).phase is Phase.LIVE
    hosted = await sidecars.healthz("gpu0")
    assert list(hosted["sessions"]) == [session_id]
    await stop_session(harness.client, session_id, "done")
    assert (await handle.result()).end_reason is EndReason.STOPPED


async def test_the_dev_api_opens_only_what_its_policy_allows(tmp_path: Path) -> None:
    """Enabled, with the credential: avatar paths outside --dev-avatar-dir (existing or not, symlinked out or
    not) and LiveKit URLs not listed are refused alike, before any file is opened."""
    allowed = tmp_path / "avatars"
    allowed.mkdir()
    (allowed / "escape.zip").symlink_to("/etc/passwd")
    host = SidecarHost(NoEngine())  # type: ignore[arg-type]
    config = ServerConfig(
        service_secret=SIDECAR_SECRET,
        dev_api=True,
        dev_avatar_dir=allowed,
        dev_livekit_urls=("ws://127.0.0.1:7880",),
    )
    transport = httpx.ASGITransport(app=create_app(host, config))
    livekit = {"url": "ws://127.0.0.1:7880", "room": "r", "identity": "i", "token": "t"}
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://sidecar", headers=service_headers()
        ) as c:
            answers = []
            for path in ("/etc/passwd", "/no/such/file.zip", str(allowed / "escape.zip"), "relative.zip"):
                response = await c.post("/v1/sessions/s1", json={"avatar_path": path, "livekit": livekit})
                assert response.status_code == 403, response.text
                answers.append(response.json())
            assert all(answer == answers[0] for answer in answers)  # no file-existence oracle
            assert answers[0]["code"] == "avatar_path_refused"
            elsewhere = {**livekit, "url": "ws://10.0.0.1:7880"}
            response = await c.post(
                "/v1/sessions/s1", json={"avatar_path": str(allowed / "a.zip"), "livekit": elsewhere}
            )
            assert response.status_code == 403 and response.json()["code"] == "livekit_url_refused"
            assert host.sessions == {}  # nothing was prepared, no slot taken
    finally:
        await host.close()


def test_a_sidecar_refuses_to_start_without_a_usable_secret(tmp_path: Path) -> None:
    import subprocess
    import sys

    from infra.paths import PROJECT_ROOT

    for env_secret in ("", "short"):
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT), "LIPSYNC_SIDECAR_SECRET": env_secret}
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "infra.cli",
                "sidecar",
                "--no-temporal",
                "--engine",
                "preview",
                "--port",
                "1",
                "--no-warm-up",
            ],
            cwd=tmp_path,
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert "LIPSYNC_SIDECAR_SECRET" in done.stderr or "at least 32" in done.stderr
    with pytest.raises(ValueError, match="at least 32"):
        create_app(SidecarHost(NoEngine()), ServerConfig())  # type: ignore[arg-type]


def test_the_api_and_the_sidecar_agree_on_audio_tokens() -> None:
    now = int(time.time())
    token = api_mint(SIDECAR_SECRET, "s1", now + 60)
    assert token == sidecar_mint(SIDECAR_SECRET, "s1", now + 60)
    assert check_audio_token(SIDECAR_SECRET, token, "s1") is None
    assert audio_token_valid(SIDECAR_SECRET, token, "s1", now)
    assert check_audio_token(SIDECAR_SECRET, token, "s2") == "bad_signature"
    assert not audio_token_valid(SIDECAR_SECRET, token, "s2", now)
    assert check_audio_token(SIDECAR_SECRET, token, "s1", now_s=now + 61) == "expired"
    assert not audio_token_valid(SIDECAR_SECRET, token, "s1", now + 61)
    assert check_audio_token(OTHER_SECRET, token, "s1") == "bad_signature"
    assert check_audio_token(SIDECAR_SECRET, None, "s1") == "missing"
    assert check_audio_token(SIDECAR_SECRET, "12.ab", "s1") == "malformed"
