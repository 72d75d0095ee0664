"""Every bad avatar input ends its session `failed` with its reason code, unretried, and harms nothing else.

All cases run as real sessions through one control worker (real dev server, loopback asset
server); the last test proves that worker still takes a good session live afterwards.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client

from realtime.outputs.registry import RtmpTarget
from tests.support import media
from tests.support.asset_server import AssetServer, Route
from tests.support.outputs import output_request
from tests.support.temporal_harness import Harness, failed_with, fast_policy, in_phase, wait_for_status
from workflows.client import stop_session
from workflows.contracts import (
    AvatarKind,
    EndReason,
    ErrorCode,
    Phase,
)

pytestmark = pytest.mark.service

MIB = 1024 * 1024
LOCAL_ACTIVITY_MARKER = "core_local_activity"  # the marker a local activity's end is recorded as


@dataclass(frozen=True)
class Case:
    name: str
    code: ErrorCode
    make_url: Callable[[AssetServer, Path], str]
    kind: AvatarKind = AvatarKind.FRAMES_ZIP
    policy: dict[str, Any] = field(default_factory=dict)
    failing_activity: str = "validate_assets"
    attempts: int = 1  # non-retryable: exactly one attempt


def serve(path: str, body: Callable[[Path], bytes]) -> Callable[[AssetServer, Path], str]:
    return lambda server, tmp: server.serve(path, body(tmp))


def fixed(url: str) -> Callable[[AssetServer, Path], str]:
    return lambda server, tmp: url


def good_zip(_: Path) -> bytes:
    return media.frames_zip()


def slow(server: AssetServer, _: Path) -> str:
    return server.add("/slow.zip", Route(body=bytes(20_000), chunk_bytes=500, chunk_delay_s=0.2))


def redirect_to(target: str) -> Callable[[AssetServer, Path], str]:
    return lambda server, tmp: server.redirect(f"/redirect-{abs(hash(target))}.zip", target)


def redirect_loop(server: AssetServer, _: Path) -> str:
    return server.redirect("/loop.zip", server.url("/loop.zip"))


def undeclared_large(server: AssetServer, _: Path) -> str:
    return server.add("/chunked-large.zip", Route(body=bytes(9 * MIB), send_length=False))


FETCH = "fetch_assets"
CASES = [
    # --- SSRF guard (no connection is ever made to these addresses) ---
    Case(
        "loopback_not_allow_listed",
        ErrorCode.URL_FORBIDDEN_ADDRESS,
        serve("/ok.zip", good_zip),
        policy={"assets__fetch__allow_networks": []},
        failing_activity=FETCH,
    ),
    Case(
        "private_address",
        ErrorCode.URL_FORBIDDEN_ADDRESS,
        fixed("http://10.0.0.7/avatar.zip"),
        failing_activity=FETCH,
    ),
    Case(
        "link_local_address",
        ErrorCode.URL_FORBIDDEN_ADDRESS,
        fixed("http://169.254.10.10/avatar.zip"),
        failing_activity=FETCH,
    ),
    Case(
        "metadata_address_even_inside_allowed_range",
        ErrorCode.URL_FORBIDDEN_ADDRESS,
        fixed("http://169.254.169.254/latest/meta-data/"),
        policy={"assets__fetch__allow_networks": ["127.0.0.1/32", "169.254.0.0/16"]},
        failing_activity=FETCH,
    ),
    Case(
        "ipv6_loopback",
        ErrorCode.URL_FORBIDDEN_ADDRESS,
        fixed("http://[::1]:9/avatar.zip"),
        failing_activity=FETCH,
    ),
    Case(
        "redirect_to_private_address",
        ErrorCode.REDIRECT_FORBIDDEN_ADDRESS,
        redirect_to("http://10.1.2.3/x.zip"),
        failing_activity=FETCH,
    ),
    Case(
        "redirect_to_metadata",
        ErrorCode.REDIRECT_FORBIDDEN_ADDRESS,
        redirect_to("http://169.254.169.254/latest/meta-data/"),
        failing_activity=FETCH,
    ),
    Case("redirect_loop", ErrorCode.TOO_MANY_REDIRECTS, redirect_loop, failing_activity=FETCH),
    Case("not_http", ErrorCode.URL_INVALID, fixed("file:///etc/passwd"), failing_activity=FETCH),
    Case(
        "credentials_in_url",
        ErrorCode.URL_INVALID,
        fixed("http://user:secret@127.0.0.1:9/a.zip"),
        failing_activity=FETCH,
    ),
    # --- limits ---
    Case(
        "too_large_declared",
        ErrorCode.ASSET_TOO_LARGE,
        serve("/large.zip", lambda _: bytes(9 * MIB)),
        failing_activity=FETCH,
    ),
    Case("too_large_streamed", ErrorCode.ASSET_TOO_LARGE, undeclared_large, failing_activity=FETCH),
    Case(
        "too_slow",
        ErrorCode.ASSET_TOO_SLOW,
        slow,
        policy={"assets__fetch__total_timeout_s": 1.0},
        failing_activity=FETCH,
    ),
    Case(
        "http_404_is_not_retried",
        ErrorCode.ASSET_HTTP_ERROR,
        lambda server, _: server.url("/no-such-avatar.zip"),
        failing_activity=FETCH,
    ),
    # --- zip safety ---
    Case(
        "not_a_zip",
        ErrorCode.NOT_A_ZIP,
        serve("/text.zip", lambda _: b"just some text, not an archive\n" * 50),
    ),
    Case("zip_bomb_ratio", ErrorCode.ZIP_BOMB_RATIO, serve("/bomb.zip", lambda _: media.bomb_zip(3 * MIB))),
    Case(
        "zip_too_large_uncompressed",
        ErrorCode.ZIP_TOO_LARGE,
        serve(
            "/big.zip",
            lambda _: media.zip_of(
                {f"frame_{i}.png": bytes(2 * MIB) for i in range(3)}, compression=zipfile.ZIP_STORED
            ),
        ),
    ),
    Case(
        "path_traversal",
        ErrorCode.ZIP_PATH_TRAVERSAL,
        serve(
            "/traversal.zip", lambda _: media.zip_of({"../../evil.png": media.png(media.astronaut_frame())})
        ),
    ),
    Case("symlink_entry", ErrorCode.ZIP_SYMLINK, serve("/symlink.zip", lambda _: media.symlink_zip())),
    Case(
        "non_image_entry",
        ErrorCode.ZIP_NON_IMAGE_ENTRY,
        serve(
            "/nonimage.zip",
            lambda _: media.zip_of(
                {"frame_1.png": media.png(media.astronaut_frame()), "run.sh": b"#!/bin/sh\nrm -rf /\n"}
            ),
        ),
    ),
    Case(
        "undecodable_image",
        ErrorCode.IMAGE_UNDECODABLE,
        serve("/garbage.zip", lambda _: media.zip_of({"frame_1.png": b"\x89PNG not really" * 20})),
    ),
    Case(
        "mixed_frame_sizes",
        ErrorCode.MIXED_FRAME_SIZES,
        serve(
            "/mixed.zip",
            lambda _: media.zip_of(
                {
                    "frame_1.png": media.png(media.astronaut_frame(128)),
                    "frame_2.png": media.png(media.astronaut_frame(96)),
                }
            ),
        ),
    ),
    Case(
        "too_many_frames", ErrorCode.TOO_MANY_FRAMES, serve("/many.zip", lambda _: media.frames_zip(41, 64))
    ),
    Case("frame_too_small", ErrorCode.FRAME_TOO_SMALL, serve("/tiny.zip", lambda _: media.frames_zip(2, 32))),
    Case("no_face", ErrorCode.NO_FACE, serve("/noise.zip", lambda _: media.noise_frames_zip())),
    # --- idle video ---
    Case(
        "video_without_video_stream",
        ErrorCode.VIDEO_NO_VIDEO_STREAM,
        serve("/voice.mp4", media.audio_only_bytes),
        kind=AvatarKind.IDLE_VIDEO,
    ),
    Case(
        "video_undecodable",
        ErrorCode.VIDEO_UNDECODABLE,
        serve("/junk.mp4", lambda _: b"\x00\x01junk" * 300),
        kind=AvatarKind.IDLE_VIDEO,
    ),
    Case(
        "video_too_many_frames",
        ErrorCode.TOO_MANY_FRAMES,
        serve("/long.mp4", lambda tmp: media.idle_video_bytes(tmp, count=45, side_px=128)),
        kind=AvatarKind.IDLE_VIDEO,
    ),
]
# Transient failures ARE retried per policy (fetch_assets.retry.maximum_attempts = 2 in the fast policy).
RETRIED = [
    Case(
        "http_503_is_retried",
        ErrorCode.ASSET_HTTP_ERROR,
        lambda server, _: server.add("/busy.zip", Route(status=503, body=b"busy")),
        failing_activity=FETCH,
        attempts=2,
    ),
    Case(
        "connection_refused_is_retried",
        ErrorCode.ASSET_UNREACHABLE,
        fixed("http://127.0.0.1:1/a.zip"),
        failing_activity=FETCH,
        attempts=2,
    ),
]


@pytest.fixture(scope="module")
async def world(temporal_client: Client, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Harness]:
    async with Harness(temporal_client, tmp_path_factory.mktemp("asset-failures")) as harness:
        await harness.add_sidecar("gpu0")
        yield harness


def _activity_attempts(events: list[HistoryEvent]) -> dict[str, list[int]]:
    """Activity type -> attempt number of each of its completed/failed executions (local activities included:
    their marker records the attempt that ended them)."""
    names: dict[int, str] = {}
    attempts: dict[str, list[int]] = {}
    for event in events:
        if event.HasField("activity_task_scheduled_event_attributes"):
            names[event.event_id] = event.activity_task_scheduled_event_attributes.activity_type.name
        elif event.HasField("activity_task_started_event_attributes"):
            started = event.activity_task_started_event_attributes
            attempts.setdefault(names[started.scheduled_event_id], []).append(started.attempt)
        elif event.marker_recorded_event_attributes.marker_name == LOCAL_ACTIVITY_MARKER:
            data = json.loads(event.marker_recorded_event_attributes.details["data"].payloads[0].data)
            attempts.setdefault(data["activity_type"], []).append(data["attempt"])
    return attempts


@pytest.mark.parametrize("case", CASES + RETRIED, ids=lambda case: case.name)
async def test_bad_asset_fails_the_session_with_its_reason_code(
    world: Harness, asset_server: AssetServer, tmp_path: Path, case: Case
) -> None:
    url = case.make_url(asset_server, tmp_path)
    request = world.request(
        url, output_request(rtmp=RtmpTarget(url="rtmp://127.0.0.1:1/live/x")), kind=case.kind
    )
    handle = await world.start(request, fast_policy(**case.policy))

    _, status = await failed_with(handle, case.code)
    assert status.end_reason is EndReason.FAILED
    assert status.error is not None and status.error.message
    assert status.sidecar == ""  # never placed: no GPU host ever saw the bad asset

    attempts = _activity_attempts(list((await handle.fetch_history()).events))
    assert attempts[case.failing_activity] == [case.attempts], attempts
    if case.failing_activity == FETCH:
        assert "validate_assets" not in attempts


async def test_worker_unharmed_after_bad_inputs(world: Harness, avatar_url: str, rtmp_server: Any) -> None:
    """Same control worker and sidecar as every bad case above: a good session still goes live and ends
    cleanly."""
    request = world.request(avatar_url, output_request(rtmp=RtmpTarget(url=rtmp_server.publish_url("after"))))
    handle = await world.start(request)
    live = await wait_for_status(handle, in_phase(Phase.LIVE))
    assert live.output == "rtmp" and live.error is None
    await stop_session(world.client, request.session_id)
    assert (await handle.result()).end_reason is EndReason.STOPPED
    assert [r.sessions for r in (await world.snapshot()).sidecars] == [[]]


async def test_idle_video_avatar_goes_live(
    world: Harness, asset_server: AssetServer, tmp_path: Path, rtmp_server: Any
) -> None:
    url = asset_server.serve("/idle.mp4", media.idle_video_bytes(tmp_path, count=12, side_px=128))
    request = world.request(
        url, output_request(rtmp=RtmpTarget(url=rtmp_server.publish_url("video"))), kind=AvatarKind.IDLE_VIDEO
    )
    handle = await world.start(request)
    live = await wait_for_status(handle, in_phase(Phase.LIVE))
    assert live.avatar is not None and live.avatar.frame_count == 12
    await stop_session(world.client, request.session_id)
    await handle.result()
