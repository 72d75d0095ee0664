"""Finding 2: any room, any identity, any session.

The API (served by uvicorn, so its audio WebSocket is real) with three tenants' keys and an admin
key, the real Temporal dev server with the control worker, a real `lipsync sidecar` process and the
real livekit-server. A session belongs to the tenant that started it: the others get 404 for every
route that names it and never see it listed; rooms live in the tenant's namespace; viewer tokens
are subscribe-only, for the caller's own rooms, in the `viewer-` identity namespace, with a capped
lifetime; an avatar identity that another participant holds is refused before joining, and that
participant stays in the room.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
import websockets
from livekit import api as lkapi

from api.app import create_app
from api.settings import ApiSettings
from infra.livekit import LiveKitServerConfig
from infra.process import free_port
from tests.support.asgi_server import serve_asgi
from tests.support.avcheck import RoomRecorder, token
from tests.support.credentials import SIDECAR_SECRET
from tests.support.sidecar_process import SidecarProcesses
from tests.support.temporal_harness import Harness, fast_policy

pytestmark = pytest.mark.service

KEYS = {"acme": "acme-key-0123456789", "globex": "globex-key-0123456789"}
DEFAULT_KEY = "default-key-0123456789"
ADMIN_KEY = "admin-key-0123456789"
VIEWER_TTL_CAP_S = 7200
SIDECAR_POLICY = {
    f"activities__{name}__heartbeat_timeout_s": 10.0
    for name in ("prepare_avatar", "warm_up", "open_output", "run_session", "stop_session", "teardown")
}


@contextlib.asynccontextmanager
async def api_server(
    harness: Harness, livekit: LiveKitServerConfig, sidecar_urls: dict[str, str]
) -> AsyncIterator[str]:
    port = free_port()
    settings = ApiSettings(
        api_keys=(DEFAULT_KEY,),
        tenant_keys={key: tenant for tenant, key in KEYS.items()},
        admin_keys=(ADMIN_KEY,),
        livekit_url=livekit.ws_url,
        livekit_api_key=livekit.api_key,
        livekit_api_secret=livekit.api_secret,
        viewer_token_max_ttl_s=VIEWER_TTL_CAP_S,
        control_task_queue=harness.control_queue,
        placement_workflow_id=harness.placement_id,
        sidecar_urls=sidecar_urls,
        sidecar_secret=SIDECAR_SECRET,
        public_base_url=f"http://127.0.0.1:{port}",
    )
    app = create_app(settings, temporal_client=harness.client, policy=fast_policy(**SIDECAR_POLICY))
    async with serve_asgi(app, port=port, name="API") as base_url:
        yield base_url


async def wait_phase(
    api: httpx.AsyncClient, session_id: str, phases: set[str], timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = (await api.get(f"/v1/sessions/{session_id}")).json()
        if body.get("phase") in phases:
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.2)


async def participants(server: LiveKitServerConfig, room: str) -> set[str]:
    client = lkapi.LiveKitAPI(server.http_url, server.api_key, server.api_secret, failover=False)
    try:
        response = await client.room.list_participants(lkapi.ListParticipantsRequest(room=room))
    finally:
        await client.aclose()
    return {participant.identity for participant in response.participants}


async def test_tenants_see_and_touch_only_their_own_sessions_rooms_and_identities(
    harness: Harness, sidecars: SidecarProcesses, livekit_server: LiveKitServerConfig, avatar_url: str
) -> None:
    sidecar_id = await sidecars.spawn("gpu0", slots=2)
    sidecar_urls = {sidecar_id: f"http://127.0.0.1:{sidecars.ports['gpu0']}"}
    intruder = RoomRecorder(mouth_box=(0, 0, 16, 16))
    async with (
        api_server(harness, livekit_server, sidecar_urls) as api_url,
        httpx.AsyncClient(base_url=api_url, headers={"X-API-Key": KEYS["acme"]}, timeout=30) as acme,
        httpx.AsyncClient(base_url=api_url, headers={"X-API-Key": KEYS["globex"]}, timeout=30) as globex,
        httpx.AsyncClient(base_url=api_url, headers={"X-API-Key": DEFAULT_KEY}, timeout=30) as default,
        httpx.AsyncClient(base_url=api_url, headers={"X-API-Key": ADMIN_KEY}, timeout=30) as admin,
    ):
        avatar = {"frames_zip_url": avatar_url}
        # Rooms: another tenant's namespace is refused; a reserved identity is refused.
        refused = await default.post(
            "/v1/sessions", json={"avatar": avatar, "output": {"livekit": {"room": "acme.x"}}}
        )
        assert refused.status_code == 403 and refused.json()["code"] == "room_not_allowed"
        reserved = await acme.post(
            "/v1/sessions",
            json={"avatar": avatar, "output": {"livekit": {"room": "show", "identity": "viewer-1"}}},
        )
        assert reserved.status_code == 400 and reserved.json()["code"] == "identity_reserved"

        created = await acme.post(
            "/v1/sessions", json={"avatar": avatar, "output": {"livekit": {"room": "show"}}}
        )
        assert created.status_code == 201, created.text
        session_id = created.json()["session_id"]
        harness.workflow_ids.append(f"session-{session_id}")
        assert created.json()["livekit"]["room"] == "acme.show"  # namespaced
        live = await wait_phase(acme, session_id, {"live"}, 60)
        assert "token=" in live["audio_ws_url"]  # a fresh audio token for the owner

        # Another tenant (named or the default one): as if the session did not exist.
        for other in (globex, default):
            for method, path in (
                ("GET", f"/v1/sessions/{session_id}"),
                ("POST", f"/v1/sessions/{session_id}/stop"),
                ("POST", f"/v1/sessions/{session_id}/interrupt"),
                ("GET", f"/debug/audio?session_id={session_id}"),
            ):
                response = await other.request(method, path)
                assert response.status_code == 404, (method, path, response.text)
                assert response.json()["code"] == "not_found"
            listed = (await other.get("/v1/sessions")).json()["sessions"]
            assert session_id not in {entry["session_id"] for entry in listed}
            assert (await other.get("/debug/audio")).status_code == 403  # every session: admins only
        ws_url = f"ws://{api_url.removeprefix('http://')}/v1/sessions/{session_id}/audio"
        async with websockets.connect(ws_url, additional_headers={"X-API-Key": KEYS["globex"]}) as ws:
            message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert message["type"] == "error" and message["code"] == "not_found"
        # Its owner and an admin see it (a room filter is namespaced as the room was).
        by_room = (await acme.get("/v1/sessions", params={"room": "show"})).json()["sessions"]
        assert [entry["session_id"] for entry in by_room] == [session_id]
        assert session_id in {
            entry["session_id"] for entry in (await acme.get("/v1/sessions")).json()["sessions"]
        }
        assert session_id in {
            entry["session_id"] for entry in (await admin.get("/v1/sessions")).json()["sessions"]
        }
        assert (await admin.get(f"/v1/sessions/{session_id}")).json()["phase"] == "live"

        # Viewer tokens: only for the caller's own rooms, subscribe-only, viewer- identities, capped lifetime.
        assert (await globex.post("/v1/livekit/token", json={"room": "acme.show"})).status_code == 404
        assert (await globex.post("/v1/livekit/token", json={"room": "show"})).status_code == 404
        not_allowed = await default.post("/v1/livekit/token", json={"room": "acme.show"})
        assert not_allowed.status_code == 403 and not_allowed.json()["code"] == "room_not_allowed"
        too_long = await acme.post("/v1/livekit/token", json={"room": "show", "ttl_s": VIEWER_TTL_CAP_S + 1})
        assert too_long.status_code == 400 and too_long.json()["code"] == "ttl_too_long"
        avatar_identity = created.json()["livekit"]["identity"]
        viewer = await acme.post("/v1/livekit/token", json={"room": "show", "identity": avatar_identity})
        assert viewer.status_code == 200, viewer.text
        body = viewer.json()
        assert body["room"] == "acme.show" and body["identity"] == f"viewer-{avatar_identity}"
        claims = jwt.decode(
            body["token"], livekit_server.api_secret, algorithms=["HS256"], options={"verify_aud": False}
        )
        assert claims["sub"] == f"viewer-{avatar_identity}"
        assert claims["video"]["room"] == "acme.show" and claims["video"]["roomJoin"] is True
        assert claims["video"]["canSubscribe"] is True and claims["video"]["canPublish"] is False
        assert claims["exp"] - claims["nbf"] <= VIEWER_TTL_CAP_S
        assert (await admin.post("/v1/livekit/token", json={"room": "acme.show"})).status_code == 200

        # Identity collision: a participant already holds the identity the avatar asks for.
        await intruder.connect(livekit_server.ws_url, token(livekit_server, "guest-7", "acme.show2"))
        try:
            clash = await acme.post(
                "/v1/sessions",
                json={"avatar": avatar, "output": {"livekit": {"room": "show2", "identity": "guest-7"}}},
            )
            assert clash.status_code == 201, clash.text
            clash_id = clash.json()["session_id"]
            harness.workflow_ids.append(f"session-{clash_id}")
            failed = await wait_phase(acme, clash_id, {"failed", "live"}, 60)
            assert failed["phase"] == "failed", failed
            assert [attempt["error"]["code"] for attempt in failed["output_attempts"]] == [
                "livekit_identity_in_use"
            ]
            assert await participants(livekit_server, "acme.show2") == {
                "guest-7"
            }  # not kicked, nobody else joined
        finally:
            await intruder.close()

        # The first session was untouched by all of it.
        assert (await acme.get(f"/v1/sessions/{session_id}")).json()["phase"] == "live"
        stopped = await acme.post(f"/v1/sessions/{session_id}/stop")
        assert stopped.status_code == 200
        await wait_phase(acme, session_id, {"completed"}, 30)
