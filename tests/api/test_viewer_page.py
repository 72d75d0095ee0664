"""The viewer page (livekit-client, built by esbuild) plays a live avatar track in headless Chromium."""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from livekit import api, rtc

from infra.livekit import LiveKitServerConfig
from infra.web import VIEWER_SOURCE_DIR, ensure_viewer_built

pytestmark = pytest.mark.service

WIDTH_PX, HEIGHT_PX = 256, 256


@pytest.fixture(scope="module")
def viewer_base_url() -> Iterator[str]:
    static_dir = ensure_viewer_built()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(static_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/index.html"
    server.shutdown()
    server.server_close()


def _token(config: LiveKitServerConfig, identity: str, room: str, *, publish: bool) -> str:
    grants = api.VideoGrants(room_join=True, room=room, can_publish=publish, can_subscribe=True)
    return (
        api.AccessToken(config.api_key, config.api_secret)
        .with_identity(identity)
        .with_grants(grants)
        .to_jwt()
    )


async def _publish_moving_pattern(room: rtc.Room, stop: asyncio.Event) -> None:
    source = rtc.VideoSource(WIDTH_PX, HEIGHT_PX)
    await room.local_participant.publish_track(
        rtc.LocalVideoTrack.create_video_track("avatar_video", source),
        rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA),
    )
    y, x = np.mgrid[0:HEIGHT_PX, 0:WIDTH_PX]
    index = 0
    while not stop.is_set():
        rgba = np.empty((HEIGHT_PX, WIDTH_PX, 4), dtype=np.uint8)
        rgba[..., 0] = ((x + index * 8) % 256).astype(np.uint8)
        rgba[..., 1] = ((y * 2 + index * 4) % 256).astype(np.uint8)
        rgba[..., 2] = 128
        rgba[..., 3] = 255
        source.capture_frame(rtc.VideoFrame(WIDTH_PX, HEIGHT_PX, rtc.VideoBufferType.RGBA, rgba.tobytes()))
        index += 1
        await asyncio.sleep(0.04)


async def test_viewer_plays_changing_frames(
    livekit_server: LiveKitServerConfig, viewer_base_url: str, tmp_path: Path
) -> None:
    node = shutil.which("node")
    assert node is not None, "Node.js is required for the viewer test"
    room_name = "viewer-room"
    publisher = rtc.Room()
    await publisher.connect(livekit_server.ws_url, _token(livekit_server, "avatar", room_name, publish=True))
    stop = asyncio.Event()
    pump = asyncio.create_task(_publish_moving_pattern(publisher, stop))
    screenshot = tmp_path / "viewer.png"
    query = urlencode(
        {"url": livekit_server.ws_url, "token": _token(livekit_server, "viewer", room_name, publish=False)}
    )
    try:
        process = await asyncio.create_subprocess_exec(
            node,
            str(VIEWER_SOURCE_DIR / "check.mjs"),
            f"{viewer_base_url}?{query}",
            str(screenshot),
            "30",
            cwd=VIEWER_SOURCE_DIR,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=90)
    finally:
        stop.set()
        await pump
        await publisher.disconnect()
    assert process.returncode == 0, stderr.decode()
    report = json.loads(stdout.decode().strip().splitlines()[-1])
    assert report["ok"], report
    stats = report["stats"]
    assert stats["state"] == "playing", report
    assert stats["framesDecoded"] >= 25, report
    assert stats["distinctFrameHashes"] >= 5, report
    assert screenshot.stat().st_size > 0


async def test_viewer_without_token_explains_what_it_needs(viewer_base_url: str, tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node is not None
    process = await asyncio.create_subprocess_exec(
        node,
        str(VIEWER_SOURCE_DIR / "check.mjs"),
        viewer_base_url,
        str(tmp_path / "error.png"),
        "5",
        cwd=VIEWER_SOURCE_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    report = json.loads(stdout.decode().strip().splitlines()[-1])
    assert report["stats"]["state"] == "error"
    assert "token" in report["stats"]["lastError"]
