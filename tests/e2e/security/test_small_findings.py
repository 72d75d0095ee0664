"""Finding 6, the smaller ones: malformed and numeric-IP URLs refused up front with 400 (no session started),
junk zip entries skipped alike by the validator and the sidecar, frame limits that agree, and health routes
that show nothing internal without an admin key. Against the API on the real Temporal dev server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client

from activities.validate import validate_frames_zip
from api.app import create_app
from api.policy_file import load_policies
from api.settings import ApiSettings
from realtime.engine.avatar.source import SourceLimits, decode_source
from tests.support.media import astronaut_frame, png, zip_of
from tests.support.temporal_harness import Harness, fast_policy

pytestmark = pytest.mark.service

KEY = "small-key-0123456789"
ADMIN_KEY = "small-admin-0123456789"


@pytest.fixture
async def api(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    settings = ApiSettings(
        api_keys=(KEY,),
        admin_keys=(ADMIN_KEY,),
        livekit_api_secret="s" * 32,
        temporal_target="127.0.0.1:7233",
        control_task_queue=harness.control_queue,
        placement_workflow_id=harness.placement_id,
    )
    # The production default: no network is allow-listed, so every non-public literal is refused.
    app = create_app(
        settings, temporal_client=harness.client, policy=fast_policy(assets__fetch__allow_networks=[])
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api.test"
    ) as client:
        yield client


async def workflow_exists(client: Client, session_id: str) -> bool:
    async for _ in client.list_workflows(f"WorkflowId = 'session-{session_id}'", limit=1):
        return True
    return False


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://[::1/a.zip", "url_invalid"),
        ("http://example.com:99999/a.zip", "url_invalid"),
        ("http://0x7f000001/a.zip", "url_forbidden_address"),
        ("http://2130706433/a.zip", "url_forbidden_address"),
        ("http://127.1/a.zip", "url_forbidden_address"),
        ("http://0177.0.0.1/a.zip", "url_forbidden_address"),
        ("http://0xa9fea9fe/latest/meta-data", "url_forbidden_address"),  # 169.254.169.254
        ("http://[::ffff:7f00:1]/a.zip", "url_forbidden_address"),
    ],
)
async def test_bad_asset_urls_are_400_before_any_session_starts(
    api: httpx.AsyncClient, harness: Harness, url: str, code: str
) -> None:
    session_id = f"url-{uuid.uuid4().hex[:8]}"
    body = {"session_id": session_id, "avatar": {"frames_zip_url": url}, "output": {"livekit": {"room": "r"}}}
    response = await api.post("/v1/sessions", json=body, headers={"X-API-Key": KEY})
    assert response.status_code == 400, response.text
    assert response.json()["code"] == code and "frames_zip_url" in response.json()["message"]
    assert not await workflow_exists(harness.client, session_id)


async def test_health_routes_show_nothing_internal_without_an_admin_key(api: httpx.AsyncClient) -> None:
    for headers in ({}, {"X-API-Key": KEY}, {"X-API-Key": "wrong"}):
        health = await api.get("/health", headers=headers)
        ready = await api.get("/readyz", headers=headers)
        assert set(health.json()) == {"status", "ready"}, health.text
        assert set(ready.json()) == {"ready"}, ready.text
        for text in (health.text, ready.text):
            assert "127.0.0.1" not in text and "@" not in text  # no Temporal address, no worker pid@host
    detailed = await api.get("/readyz", headers={"X-API-Key": ADMIN_KEY})
    assert detailed.json()["checks"]["temporal"]["ok"] is True
    assert "127.0.0.1" in detailed.text


def test_junk_entries_are_skipped_alike_by_validator_and_sidecar(tmp_path: Path) -> None:
    """`__MACOSX/` folders and hidden files are skipped by both; a frame merely *named* like junk is a frame
    to
    both (the sidecar used to skip any name containing `__MACOSX`, which the validator counted)."""
    frame = png(astronaut_frame(128))
    data = zip_of(
        {
            "frames/frame_1.png": frame,
            "frames/__MACOSX_frame_2.png": frame,
            "__MACOSX/frames/._frame_1.png": b"resource fork, not an image",
            "frames/.hidden.png": b"not an image either",
            "frames/Thumbs.db": b"junk",
        }
    )
    path = tmp_path / "avatar.zip"
    path.write_bytes(data)
    policy = load_policies()
    report = validate_frames_zip(path, policy.assets.zip, policy.assets.frames)
    decoded = decode_source(data)
    assert report.frame_count == len(decoded.frames) == 2
    assert set(decoded.names) == {"frames/frame_1.png", "frames/__MACOSX_frame_2.png"}


def test_documented_frame_limits_are_the_sidecars() -> None:
    policy = load_policies()
    sidecar = SourceLimits()
    assert policy.assets.frames.max_frames == sidecar.max_frames
    assert policy.assets.video.max_frames == sidecar.max_frames
    assert policy.assets.frames.max_side_px**2 <= sidecar.max_frame_pixels
    # The validator prices an avatar as the sidecar will hold it.
    assert policy.assets.frames.max_output_side_px == sidecar.max_output_side_px
    assert policy.assets.frames.max_total_pixels == sidecar.max_total_pixels
    docs = (Path(__file__).parents[3] / "docs" / "api.md").read_text()
    assert f"1 … {sidecar.max_frames:,} frames".replace(",", " ") in docs
