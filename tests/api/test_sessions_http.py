"""The session API through its HTTP surface, on a real Temporal dev server with the production control worker.

Auth (401), validation (422 with field names), SSRF refusals (400 with a code at the door, or a
failed session with the fetch activity's code), duplicate ids (409), unknown sessions (404),
listing through visibility, readiness, metrics, OpenAPI and the trace id header.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from api.app import create_app
from api.settings import ApiSettings
from infra.temporal import TemporalDevServerConfig
from tests.api.tracing_support import span_exporter, span_names
from tests.support.temporal_harness import Harness, fast_policy
from workflows.temporal_client import connect_client

pytestmark = pytest.mark.service

KEY = "test-key"
AUTH = {"X-API-Key": KEY}
ADMIN_KEY = "test-admin-key"
ADMIN_AUTH = {"X-API-Key": ADMIN_KEY}
PRIVATE_URLS_OK = "http://assets.invalid/avatar.zip"  # a name: only the fetch activity can judge it
ZIP = {"frames_zip_url": "http://a/x.zip"}
LIVEKIT = {"livekit": {"room": "r"}}


@pytest.fixture(scope="module")
async def traced_client(temporal_dev_server: TemporalDevServerConfig) -> Client:
    span_exporter()  # install before the client's TracingInterceptor starts making spans
    return await connect_client(temporal_dev_server.target)


@pytest.fixture
async def world(traced_client: Client, tmp_path: Path) -> AsyncIterator[Harness]:
    async with Harness(traced_client, tmp_path) as harness:
        yield harness


def make_api(harness: Harness, **policy_overrides: Any) -> httpx.AsyncClient:
    settings = ApiSettings(
        api_keys=(KEY,),
        admin_keys=(ADMIN_KEY,),
        livekit_api_secret="secret-0123456789abcdef0123456789abcdef",
        control_task_queue=harness.control_queue,
        placement_workflow_id=harness.placement_id,
        temporal_ui_url="http://ui.test",
    )
    # No allow-listed networks unless a test says so: the SSRF guard applies as in production.
    policy = fast_policy(**{"assets__fetch__allow_networks": [], **policy_overrides})
    app = create_app(settings, temporal_client=harness.client, policy=policy)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test", timeout=30)


def session_body(url: str = PRIVATE_URLS_OK, **extra: Any) -> dict[str, Any]:
    return {"avatar": {"frames_zip_url": url}, "output": {"livekit": {"room": "room-1"}}, **extra}


async def wait_phase(
    api: httpx.AsyncClient, session_id: str, phases: set[str], timeout_s: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        response = await api.get(f"/v1/sessions/{session_id}", headers=AUTH)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["phase"] in phases:
            return body
        assert time.monotonic() < deadline, f"phase {body['phase']} after {timeout_s} s: {body}"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/sessions"),
        ("GET", "/v1/sessions"),
        ("GET", "/v1/sessions/abc"),
        ("POST", "/v1/sessions/abc/stop"),
        ("POST", "/v1/sessions/abc/interrupt"),
        ("POST", "/session/start"),
        ("GET", "/debug/audio"),
        ("GET", "/debug/musetalk"),
    ],
)
async def test_every_session_route_needs_an_api_key(world: Harness, method: str, path: str) -> None:
    async with make_api(world) as api:
        response = await api.request(method, path, json=session_body())
        wrong = await api.request(method, path, json=session_body(), headers={"X-API-Key": "nope"})
    assert response.status_code == 401 and wrong.status_code == 401
    assert response.json()["code"] == "unauthorized"
    assert set(wrong.json()) == {"code", "message"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"output": {"livekit": {"room": "r"}}}, "avatar"),
        (
            {"avatar": {"frames_zip_url": "http://a/x", "idle_video_url": "http://a/v"}, "output": LIVEKIT},
            "avatar",
        ),
        ({"avatar": ZIP, "output": {"livekit": {"room": "bad room!"}}}, "output.livekit.room"),
        ({"avatar": ZIP, "output": {}}, "output"),
        ({"avatar": ZIP, "output": {"rtmp": {"url": "http://x"}}}, "output.rtmp.url"),
        (session_body(idle_timeout_s=-1), "idle_timeout_s"),
        (session_body(audio={"sample_rate": 100}), "audio.sample_rate"),
        (session_body(audio={"encoding": "mp3"}), "audio.encoding"),
        (session_body(session_id="../etc"), "session_id"),
        (session_body(colour="blue"), "colour"),
    ],
)  # fmt: skip
async def test_validation_errors_are_422_with_field_names(
    world: Harness, body: dict[str, Any], field: str
) -> None:
    async with make_api(world) as api:
        response = await api.post("/v1/sessions", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    document = response.json()
    assert document["code"] == "validation_error"
    assert field in [entry["field"] for entry in document["fields"]], document
    assert field in document["message"]


@pytest.mark.parametrize(
    ("url", "code", "words"),
    [
        ("http://127.0.0.1:8080/a.zip", "url_forbidden_address", "loopback"),
        ("http://localhost/a.zip", "url_forbidden_address", "loopback"),
        ("http://LocalHost./a.zip", "url_forbidden_address", "loopback"),
        ("http://[::ffff:127.0.0.1]/a.zip", "url_forbidden_address", "loopback"),
        ("http://[2002:7f00:1::1]/a.zip", "url_forbidden_address", "loopback"),  # 6to4 carrying 127.0.0.1
        (
            "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/a.zip",
            "url_forbidden_address",
            "loopback",
        ),  # Teredo
        ("http://10.1.2.3/a.zip", "url_forbidden_address", "private"),
        ("http://192.168.0.10/a.zip", "url_forbidden_address", "private"),
        ("http://169.254.169.254/latest/meta-data/", "url_forbidden_address", "cloud metadata"),
        ("file:///etc/passwd", "url_invalid", "http"),
        ("gopher://example.com/x", "url_invalid", "http"),
        ("http://user:pw@example.com/a.zip", "url_invalid", "credentials"),
    ],
)
async def test_ssrf_literal_addresses_are_refused_at_the_door(
    world: Harness, url: str, code: str, words: str
) -> None:
    async with make_api(world) as api:
        response = await api.post("/v1/sessions", json=session_body(url), headers=AUTH)
        listed = await api.get("/v1/sessions", headers=AUTH)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == code
    assert words in response.json()["message"]
    assert listed.status_code == 200


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433/avatar.zip",  # 127.0.0.1 written as one number
        "http://127.1/avatar.zip",  # the short dotted form inet_aton accepts
        "http://0x7f.0.0.1/avatar.zip",  # hex octets
    ],
)
async def test_numeric_ip_forms_of_loopback_are_refused_up_front(world: Harness, url: str) -> None:
    """Resolvers read these as 127.0.0.1: the API judges them as that address, 400 before any session starts
    (the
    fetch activity's guard, which resolves every name, refuses them too:
    tests/activities/test_net_guard.py)."""
    async with make_api(world) as api:
        created = await api.post("/v1/sessions", json=session_body(url), headers=AUTH)
    assert created.status_code == 400, created.text
    assert created.json()["code"] == "url_forbidden_address" and "loopback" in created.json()["message"]


async def test_created_session_fields_duplicate_409_and_trace_header(world: Harness) -> None:
    session_id = f"dup-{uuid.uuid4().hex[:8]}"
    body = session_body(
        session_id=session_id, audio={"sample_rate": 48000, "encoding": "f32le", "channels": 2}
    )
    async with make_api(world) as api:
        first = await api.post("/v1/sessions", json=body, headers=AUTH)
        second = await api.post("/v1/sessions", json=body, headers=AUTH)
        world.workflow_ids.append(f"session-{session_id}")
        status = await api.get(f"/v1/sessions/{session_id}", headers=AUTH)
        final = await wait_phase(api, session_id, {"failed", "completed"})
    assert first.status_code == 201, first.text
    created = first.json()
    assert created["session_id"] == session_id
    assert created["audio_ws_url"] == (
        f"ws://127.0.0.1:8000/v1/sessions/{session_id}/audio?sample_rate=48000&encoding=f32le&channels=2"
    )
    assert created["livekit"] == {
        "url": "ws://127.0.0.1:7880",
        "room": "room-1",
        "identity": f"avatar-{session_id}",
    }
    assert created["status_url"] == f"http://127.0.0.1:8000/v1/sessions/{session_id}"
    assert created["temporal_ui_url"] == f"http://ui.test/namespaces/default/workflows/session-{session_id}"
    assert second.status_code == 409
    assert second.json() == {"code": "session_exists", "message": f"session {session_id!r} already exists"}
    # One trace id for the session: the create response's, repeated by later calls about it.
    trace_id = first.headers["X-Trace-Id"]
    assert created["trace_id"] == trace_id and len(trace_id) == 32
    assert status.headers["X-Trace-Id"] == trace_id and status.json()["trace_id"] == trace_id
    assert final["phase"] == "failed" and final["error"]["code"] == "asset_unreachable"
    # how the control plane's faults touched it: nothing here (the fetch failed before any sidecar)
    assert (final["replacements"], final["reconciles"], final["steps_asked_again"]) == (0, 0, 0)
    names = span_names(trace_id)
    assert {"POST /v1/sessions", "StartWorkflow:SessionWorkflow", "RunActivity:fetch_assets"} <= set(names), (
        names
    )


async def test_unknown_sessions_are_404(world: Harness) -> None:
    async with make_api(world) as api:
        responses = [
            await api.get("/v1/sessions/no-such-session", headers=AUTH),
            await api.post("/v1/sessions/no-such-session/stop", headers=AUTH),
            await api.post("/v1/sessions/no-such-session/interrupt", headers=AUTH),
            await api.get("/debug/audio", params={"session_id": "no-such-session"}, headers=AUTH),
        ]
    for response in responses:
        assert response.status_code == 404, response.text
        assert response.json() == {"code": "not_found", "message": "no session 'no-such-session'"}


async def test_list_stop_and_interrupt_of_a_session(world: Harness, tmp_path: Path) -> None:
    """A session waits in `placing` (no sidecar): listed by room and phase; interrupt needs audio; stop ends
    it."""
    room = f"room-{uuid.uuid4().hex[:8]}"
    async with make_api(world, assets__fetch__allow_networks=["127.0.0.1/32"]) as api:
        from tests.support.asset_server import AssetServer
        from tests.support.media import frames_zip

        server = AssetServer().start()
        try:
            url = server.serve("/a.zip", frames_zip(), "application/zip")
            body = {"avatar": {"frames_zip_url": url}, "output": {"livekit": {"room": room}}}
            created = (await api.post("/v1/sessions", json=body, headers=AUTH)).json()
            session_id = created["session_id"]
            world.workflow_ids.append(f"session-{session_id}")
            await wait_phase(api, session_id, {"placing"})
            deadline = time.monotonic() + 15
            while True:  # visibility is eventually consistent
                listed = (await api.get("/v1/sessions", params={"room": room}, headers=AUTH)).json()[
                    "sessions"
                ]
                if listed and listed[0]["phase"] == "placing":
                    break
                assert time.monotonic() < deadline, listed
                await asyncio.sleep(0.2)
            interrupt = await api.post(f"/v1/sessions/{session_id}/interrupt", headers=AUTH)
            stopped = await api.post(f"/v1/sessions/{session_id}/stop", json={"reason": "test"}, headers=AUTH)
            final = await wait_phase(api, session_id, {"completed", "failed", "cancelled"})
            again = await api.post(f"/v1/sessions/{session_id}/stop", headers=AUTH)
        finally:
            server.stop()
    assert [(s["session_id"], s["room"]) for s in listed] == [(session_id, room)]
    assert interrupt.status_code == 409 and interrupt.json()["code"] == "no_audio_connection"
    assert interrupt.headers["X-Trace-Id"] == created["trace_id"]
    assert stopped.status_code == 200, stopped.text
    assert stopped.headers["X-Trace-Id"] == created["trace_id"]
    assert final["phase"] == "completed" and final["end_reason"] == "stopped"
    assert again.status_code == 200 and again.json()["phase"] == "completed"  # stop is idempotent
    assert "session.stop" in span_names(created["trace_id"])


async def test_readyz_needs_a_control_worker_and_a_polling_sidecar(world: Harness) -> None:
    async with make_api(world) as api:
        deadline = time.monotonic() + 10
        while True:  # a worker shows up as a poller once its first poll reaches the server
            before = await api.get("/readyz", headers=ADMIN_AUTH)
            if before.json()["checks"]["control_workers"]["ok"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        await world.add_sidecar("ready")
        deadline = time.monotonic() + 10
        while (after := await api.get("/readyz", headers=ADMIN_AUTH)).status_code != 200:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        health = await api.get("/health", headers=ADMIN_AUTH)
        bare = await api.get("/readyz")
    assert bare.json() == {"ready": True}  # without an admin key: no addresses, no worker identities
    assert before.status_code == 503
    checks = before.json()["checks"]
    assert checks["temporal"]["ok"] and checks["control_workers"]["ok"]
    assert not checks["sidecars"]["ok"]
    assert after.status_code == 200, after.text
    sidecars = after.json()["checks"]["sidecars"]["registered"]
    assert sidecars[world.sidecar_id("ready")]["pollers"], sidecars
    assert health.status_code == 200 and health.json()["ready"] is True


async def test_readyz_and_metrics_when_temporal_is_unreachable() -> None:
    from infra.process import free_port

    settings = ApiSettings(
        api_keys=(KEY,), admin_keys=(ADMIN_KEY,), temporal_target=f"127.0.0.1:{free_port()}"
    )
    app = create_app(settings, policy=fast_policy())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as api:
        ready = await api.get("/readyz", headers=ADMIN_AUTH)
        metrics = await api.get("/metrics", headers=ADMIN_AUTH)
        # The per-session series name every tenant's sessions: no key is 401, a tenant's key 403.
        keyless, tenant = await api.get("/metrics"), await api.get("/metrics", headers=AUTH)
        create = await api.post("/v1/sessions", json=session_body(), headers=AUTH)
    assert (keyless.status_code, keyless.json()["code"]) == (401, "unauthorized")
    assert (tenant.status_code, tenant.json()["code"]) == (403, "admin_only")
    assert "lipsync_" not in keyless.text + tenant.text
    assert ready.status_code == 503 and ready.json()["checks"]["temporal"]["ok"] is False
    assert metrics.status_code == 200 and "lipsync_temporal_up 0.0" in metrics.text
    assert create.status_code == 503 and create.json()["code"] == "temporal_unavailable"


async def test_metrics_count_sessions_by_phase(world: Harness) -> None:
    async with make_api(world) as api:
        created = await api.post("/v1/sessions", json=session_body(), headers=AUTH)
        world.workflow_ids.append(f"session-{created.json()['session_id']}")
        await wait_phase(api, created.json()["session_id"], {"failed"})
        text = (await api.get("/metrics", headers=ADMIN_AUTH)).text
    assert "lipsync_temporal_up 1.0" in text
    assert 'lipsync_sessions_ended_total{status="failed"}' in text
    assert 'lipsync_sessions_started_total{result="started"}' in text
    assert (
        'lipsync_api_request_duration_seconds_count{method="POST",route="/v1/sessions",status="201"}' in text
    )


async def test_openapi_documents_the_session_api(world: Harness) -> None:
    async with make_api(world) as api:
        document = (await api.get("/openapi.json")).json()
    paths = document["paths"]
    for path in (
        "/v1/sessions",
        "/v1/sessions/{session_id}",
        "/v1/sessions/{session_id}/stop",
        "/session/start",
    ):
        assert path in paths, sorted(paths)
    assert "201" in paths["/v1/sessions"]["post"]["responses"]
    assert "409" in paths["/v1/sessions"]["post"]["responses"]
    assert {"readyz", "metrics", "health"} <= {p.strip("/").split("/")[0] for p in paths}


async def test_seed_session_start_maps_onto_a_session(world: Harness) -> None:
    async with make_api(world) as api:
        response = await api.post(
            "/session/start",
            json={"room": "seed-room", "frames_zip_url": "http://10.0.0.1/a.zip", "connect_livekit": True},
            headers=AUTH,
        )
        no_output = await api.post(
            "/session/start",
            json={
                "room": "seed-room",
                "frames_zip_url": "http://assets.invalid/a.zip",
                "connect_livekit": False,
            },
            headers=AUTH,
        )
    assert response.status_code == 400 and response.json()["code"] == "url_forbidden_address"
    assert no_output.status_code == 422 and "rtmp_url" in no_output.json()["message"]


async def test_debug_musetalk_reports_the_model_dir_like_models_check(world: Harness, tmp_path: Path) -> None:
    import dataclasses

    from infra.cli.models import check_document

    async with make_api(world) as api:
        api_app = api._transport.app  # type: ignore[attr-defined]
        services = api_app.state.services
        services.settings = dataclasses.replace(services.settings, model_dir=tmp_path / "empty-models")
        response = await api.get("/debug/musetalk", headers=ADMIN_AUTH)
        tenant = await api.get("/debug/musetalk", headers=AUTH)
    assert (
        tenant.status_code == 403 and tenant.json()["code"] == "admin_only"
    )  # model paths are the operator's
    assert response.status_code == 200, response.text
    document = response.json()
    expected = check_document(tmp_path / "empty-models")
    assert document["files"] == expected["files"] and document["ok"] is False
    assert document["engine_auto_would_use"] == "preview"
    assert (
        document["face_parsing"]["present"] is False and document["face_parsing"]["blend_mask"] == "ellipse"
    )
    assert document["sidecars"] == {}


async def test_list_pages_through_visibility(world: Harness) -> None:
    room = f"paged-{uuid.uuid4().hex[:8]}"
    body = {"avatar": {"frames_zip_url": PRIVATE_URLS_OK}, "output": {"livekit": {"room": room}}}
    async with make_api(world) as api:
        ids = set()
        for _ in range(2):
            session_id = (await api.post("/v1/sessions", json=body, headers=AUTH)).json()["session_id"]
            world.workflow_ids.append(f"session-{session_id}")
            ids.add(session_id)
        deadline = time.monotonic() + 15
        while (
            len((await api.get("/v1/sessions", params={"room": room}, headers=AUTH)).json()["sessions"]) < 2
        ):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        first = (await api.get("/v1/sessions", params={"room": room, "page_size": 1}, headers=AUTH)).json()
        second = (
            await api.get(
                "/v1/sessions",
                params={"room": room, "page_size": 1, "page_token": first["next_page_token"]},
                headers=AUTH,
            )
        ).json()
        bad = await api.get("/v1/sessions", params={"page_token": "%%%"}, headers=AUTH)
        for session_id in ids:  # let them end (asset_unreachable) before the worker stops
            await wait_phase(api, session_id, {"failed"})
    assert len(first["sessions"]) == 1 and first["next_page_token"]
    assert {first["sessions"][0]["session_id"], second["sessions"][0]["session_id"]} == ids
    assert bad.status_code == 400 and bad.json()["code"] == "bad_page_token"


async def test_temporal_and_unexpected_errors_keep_the_error_body() -> None:
    from temporalio.service import RPCError, RPCStatusCode

    app = create_app(ApiSettings(api_keys=(KEY,)), policy=fast_policy())

    @app.get("/boom/{kind}")
    async def boom(kind: str) -> None:
        if kind == "unavailable":
            raise RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")
        if kind == "internal":
            raise RPCError("bad", RPCStatusCode.INTERNAL, b"")
        raise ZeroDivisionError("nope")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as api:
        unavailable = await api.get("/boom/unavailable")
        internal = await api.get("/boom/internal")
        crash = await api.get("/boom/crash")
    assert unavailable.status_code == 503 and unavailable.json()["code"] == "temporal_unavailable"
    assert internal.status_code == 502 and internal.json()["code"] == "temporal_error"
    assert crash.status_code == 500 and crash.json() == {
        "code": "internal_error",
        "message": "ZeroDivisionError; the API log has the details",
    }
