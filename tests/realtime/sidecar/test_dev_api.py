"""The sidecar's dev HTTP API answers errors as `{code, message}` (+ `fields` for a malformed body)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from infra.livekit import LiveKitServerConfig
from realtime.sidecar.config import HostConfig, ServerConfig, SidecarSettings
from realtime.sidecar.host import SidecarHost
from realtime.sidecar.process import build_host
from realtime.sidecar.server import create_app
from tests.support.avcheck import token
from tests.support.credentials import SIDECAR_SECRET, service_headers
from tests.support.fake_engine import NoEngine
from tests.support.media import frames_zip


async def test_errors_carry_a_code_a_sentence_and_the_bad_fields() -> None:
    host = SidecarHost(NoEngine())  # type: ignore[arg-type]
    transport = httpx.ASGITransport(
        app=create_app(host, ServerConfig(service_secret=SIDECAR_SECRET, dev_api=True))
    )
    try:
        headers = service_headers()
        async with httpx.AsyncClient(
            transport=transport, base_url="http://sidecar", headers=headers
        ) as client:
            bad = await client.post("/v1/sessions/s1", json={"avatar_path": "a.zip", "idle_timeout_s": -1})
            assert bad.status_code == 422
            body = bad.json()
            assert body["code"] == "validation_error" and "idle_timeout_s" in body["message"]
            assert {field["field"] for field in body["fields"]} >= {"idle_timeout_s", "livekit"}
            unknown = await client.delete("/v1/sessions/nobody")
            assert unknown.status_code == 404
            assert unknown.json() == {"code": "unknown_session", "message": "no session nobody"}
            no_route = await client.get("/v2/nothing")
            assert no_route.status_code == 404 and no_route.json()["code"] == "http_error"
    finally:
        await host.close()


async def test_the_dev_api_drives_the_host_lifecycle_and_gives_every_slot_back(
    tmp_path: Path, livekit_server: LiveKitServerConfig
) -> None:
    """A real host (preview engine) and the real livekit-server: POST runs prepare -> warm -> open -> run, a
    failed step (no free slot, a refused LiveKit token) answers 409 with its code and tears down what it
    prepared, DELETE stops and tears down; the host's slot is free again after each."""
    settings = SidecarSettings(engine="preview", cache_dir=tmp_path / "cache", host=HostConfig(slots_total=1))
    host = build_host(settings)
    avatar = tmp_path / "avatar.zip"
    avatar.write_bytes(frames_zip())
    config = ServerConfig(
        service_secret=SIDECAR_SECRET,
        dev_api=True,
        dev_avatar_dir=tmp_path,
        dev_livekit_urls=(livekit_server.ws_url,),
    )
    transport = httpx.ASGITransport(app=create_app(host, config))

    def body(session_id: str, livekit_token: str | None = None) -> dict[str, Any]:
        room, identity = f"room-{session_id}", f"avatar-{session_id}"
        return {
            "avatar_path": str(avatar),
            "livekit": {
                "url": livekit_server.ws_url,
                "room": room,
                "identity": identity,
                "token": livekit_token or token(livekit_server, identity, room),
            },
        }

    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://sidecar", headers=service_headers(), timeout=60
        ) as client:
            started = await client.post("/v1/sessions/dev-1", json=body("dev-1"))
            assert started.status_code == 200, started.text
            answer = started.json()
            assert answer["output"] == {"kind": "livekit", "detail": "room-dev-1"}
            assert answer["engine"]["engine"] == "preview"
            assert answer["audio_ws"] == "/v1/sessions/dev-1/audio"
            assert host.capacity().slots_free == 0
            stats = await client.get("/v1/sessions/dev-1/stats")
            assert stats.status_code == 200 and stats.json()["session_id"] == "dev-1"

            full = await client.post("/v1/sessions/dev-2", json=body("dev-2"))
            assert full.status_code == 409 and full.json()["code"] == "no_free_slot", full.text
            assert list(host.sessions) == ["dev-1"]

            stopped = await client.delete("/v1/sessions/dev-1")
            assert stopped.status_code == 200 and stopped.json() == {"session_id": "dev-1", "stopped": True}
            assert host.sessions == {} and host.capacity().slots_free == 1

            # A token livekit-server did not sign: it refuses the join, so open_output fails after the avatar
            # was prepared (the slot taken), and the failed start gives the slot back.
            refused = await client.post("/v1/sessions/dev-3", json=body("dev-3", livekit_token="not-a-token"))
            assert refused.status_code == 409, refused.text
            assert refused.json()["code"].startswith("livekit"), refused.text
            assert host.sessions == {} and host.capacity().slots_free == 1
    finally:
        await host.close()
