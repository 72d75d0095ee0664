"""No lost requests: stop right after create, stop twice, and garbage page tokens, through the HTTP API.

On a real Temporal dev server with the production control worker (tests/api/test_sessions_http.py's
world): each answer is a success or a clear status with a code, never a 502 and never a dropped stop.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Iterator

import pytest

from tests.api.test_sessions_http import AUTH, make_api, traced_client, wait_phase, world  # noqa: F401
from tests.support.asset_server import AssetServer
from tests.support.media import frames_zip
from tests.support.temporal_harness import Harness

pytestmark = pytest.mark.service

STOPS_RIGHT_AFTER_CREATE = 12


@pytest.fixture(scope="module")
def avatar_url() -> Iterator[str]:
    server = AssetServer().start()
    try:
        yield server.serve("/avatars/astronaut.zip", frames_zip(), "application/zip")
    finally:
        server.stop()


async def test_a_stop_right_after_create_is_never_lost(world: Harness, avatar_url: str) -> None:  # noqa: F811
    # A slow prepare keeps every session short of its output (which fails here: no LiveKit credentials)
    # until well after the last stop is sent: each one must end `stopped`, none may fail or go on.
    await world.add_sidecar("a", slots=STOPS_RIGHT_AFTER_CREATE, prepare_frame_delay_s=0.5)
    async with make_api(world, assets__fetch__allow_networks=["127.0.0.1/32"]) as api:

        async def create_then_stop(delay_s: float) -> tuple[str, int, str, dict[str, object]]:
            room = f"room-{uuid.uuid4().hex[:8]}"
            body = {"avatar": {"frames_zip_url": avatar_url}, "output": {"livekit": {"room": room}}}
            created = await api.post("/v1/sessions", json=body, headers=AUTH)
            assert created.status_code == 201, created.text
            session_id = created.json()["session_id"]
            world.workflow_ids.append(f"session-{session_id}")
            await asyncio.sleep(delay_s)
            stopped = await api.post(
                f"/v1/sessions/{session_id}/stop", json={"reason": "at once"}, headers=AUTH
            )
            final = await wait_phase(api, session_id, {"completed", "failed", "cancelled"})
            return session_id, stopped.status_code, stopped.text, final

        results = await asyncio.gather(*(create_then_stop(0.05 * i) for i in range(STOPS_RIGHT_AFTER_CREATE)))
    bad = [(sid, code, text) for sid, code, text, _ in results if code != 200]
    assert bad == [], bad
    # The stop was taken: every session ended `stopped` (not failed on its unreachable asset).
    not_stopped = [(sid, final["end_reason"], final.get("error")) for sid, _, _, final in results]
    assert [entry for entry in not_stopped if entry[1] != "stopped"] == []


async def test_stop_twice_at_once_while_placing_both_succeed(world: Harness, avatar_url: str) -> None:  # noqa: F811
    """No sidecar: the session waits in `placing`; two concurrent stops both answer 200 and it ends
    `stopped`."""
    async with make_api(world, assets__fetch__allow_networks=["127.0.0.1/32"]) as api:
        body = {
            "avatar": {"frames_zip_url": avatar_url},
            "output": {"livekit": {"room": f"r-{uuid.uuid4().hex[:8]}"}},
        }
        session_id = (await api.post("/v1/sessions", json=body, headers=AUTH)).json()["session_id"]
        world.workflow_ids.append(f"session-{session_id}")
        await wait_phase(api, session_id, {"placing"})
        first, second = await asyncio.gather(
            *(
                api.post(f"/v1/sessions/{session_id}/stop", json={"reason": n}, headers=AUTH)
                for n in ("a", "b")
            )
        )
        final = await wait_phase(api, session_id, {"completed", "failed", "cancelled"})
        after = await api.post(f"/v1/sessions/{session_id}/stop", headers=AUTH)
    assert (first.status_code, second.status_code, after.status_code) == (200, 200, 200), (
        first.text,
        second.text,
    )
    assert final["phase"] == "completed" and final["end_reason"] == "stopped", final


@pytest.mark.parametrize(
    "token",
    [
        base64.urlsafe_b64encode(b"garbage, not a token").decode(),  # valid base64, meaningless to Temporal
        base64.urlsafe_b64encode(bytes(range(256))).decode(),
        "%%%",  # not base64 at all
    ],
)
async def test_a_garbage_page_token_is_400_with_a_code(world: Harness, token: str) -> None:  # noqa: F811
    async with make_api(world) as api:
        response = await api.get("/v1/sessions", params={"page_token": token}, headers=AUTH)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "bad_page_token" and response.json()["message"], response.text
