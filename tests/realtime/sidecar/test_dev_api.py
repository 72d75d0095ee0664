"""The sidecar's dev HTTP API answers errors as `{code, message}` (+ `fields` for a malformed body)."""

from __future__ import annotations

import httpx

from realtime.sidecar.config import ServerConfig
from realtime.sidecar.host import SidecarHost
from realtime.sidecar.server import create_app
from tests.support.credentials import SIDECAR_SECRET, service_headers
from tests.support.fake_engine import NoEngine


async def test_errors_carry_a_code_a_sentence_and_the_bad_fields() -> None:
    host = SidecarHost(NoEngine())  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=create_app(host, ServerConfig(service_secret=SIDECAR_SECRET, dev_api=True)))
    try:
        headers = service_headers()
        async with httpx.AsyncClient(transport=transport, base_url="http://sidecar", headers=headers) as client:
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
