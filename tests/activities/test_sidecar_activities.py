"""Sidecar activities in Temporal's ActivityEnvironment: incarnation guard, asset copies, heartbeats,
shutdown."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.sidecar import SidecarActivities, SidecarWorkerConfig
from realtime.host import PrepareProgress
from realtime.outputs.registry import RTMP
from tests.support import media
from tests.support.asset_server import AssetServer
from tests.support.session_host import LoopbackSessionHost
from workflows.contracts import (
    AvatarKind,
    ErrorCode,
    FetchedAsset,
    OpenOutputInput,
    OutputSpec,
    PrepareAvatarInput,
    RunSessionInput,
    SidecarCall,
    TeardownInput,
    ValidatedAvatar,
    sidecar_task_queue,
)
from workflows.policy import SessionPolicy


def make_activities(tmp_path: Path) -> SidecarActivities:
    host = LoopbackSessionHost("t", sidecar_task_queue("t"), 2, tmp_path / "cache")
    config = SidecarWorkerConfig.for_host(host, tmp_path / "sidecar-assets")
    return SidecarActivities(host, config, incarnation="current")


def avatar(url: str, body: bytes, stored_path: str) -> ValidatedAvatar:
    asset = FetchedAsset(
        source_url=url,
        final_url=url,
        kind=AvatarKind.FRAMES_ZIP,
        digest_sha256=hashlib.sha256(body).hexdigest(),
        size_bytes=len(body),
        stored_path=stored_path,
    )
    return ValidatedAvatar(asset=asset, frame_count=6, width_px=128, height_px=128, face=None)


async def test_calls_for_a_previous_incarnation_are_refused(tmp_path: Path, policy: SessionPolicy) -> None:
    activities = make_activities(tmp_path)
    body = media.frames_zip()
    request = PrepareAvatarInput(
        call=SidecarCall("s1", incarnation="before-restart"),
        avatar=avatar("http://x", body, "/nowhere"),
        fetch=policy.assets.fetch,
    )
    with pytest.raises(ApplicationError) as refused:
        await ActivityEnvironment().run(activities.prepare_avatar, request)
    assert refused.value.type == ErrorCode.SIDECAR_RESTARTED.value and refused.value.non_retryable
    # ...and a teardown left queued for the dead predecessor is a harmless no-op.
    teardown = TeardownInput(SidecarCall("s1", incarnation="before-restart"))
    assert await ActivityEnvironment().run(activities.teardown, teardown) is False


async def test_asset_not_on_this_disk_is_downloaded_and_digest_checked(
    tmp_path: Path, policy: SessionPolicy, asset_server: AssetServer
) -> None:
    activities = make_activities(tmp_path)
    body = media.frames_zip()
    url = asset_server.serve("/sidecar/a.zip", body)
    request = PrepareAvatarInput(
        call=SidecarCall("s1", "current"),
        avatar=avatar(url, body, "/control-plane/only"),
        fetch=policy.assets.fetch,
    )
    ready = await ActivityEnvironment().run(activities.prepare_avatar, request)
    assert ready.frame_count == 6 and not ready.cache_hit
    assert (tmp_path / "sidecar-assets" / f"{hashlib.sha256(body).hexdigest()}.zip").read_bytes() == body

    # The URL now serves other bytes than were validated: refused, never prepared.
    asset_server.serve("/sidecar/b.zip", media.frames_zip(count=3))
    changed = PrepareAvatarInput(
        call=SidecarCall("s2", "current"),
        avatar=avatar(asset_server.url("/sidecar/b.zip"), b"what was validated", "/control-plane/only"),
        fetch=policy.assets.fetch,
    )
    with pytest.raises(ApplicationError) as refused:
        await ActivityEnvironment().run(activities.prepare_avatar, changed)
    assert refused.value.type == ErrorCode.ASSET_CHANGED.value
    assert "s2" not in activities.host.sessions  # type: ignore[attr-defined]


async def test_prepare_progress_from_the_real_hosts_render_thread_heartbeats(
    tmp_path: Path, policy: SessionPolicy
) -> None:
    """SidecarHost reports progress from its render lane thread, outside the activity's context:
    every progress report must still become a heartbeat (the liveness signal of a long prepare)."""
    from realtime.sidecar.config import HostConfig, SidecarSettings
    from realtime.sidecar.process import build_host

    host = build_host(
        SidecarSettings(
            engine="preview",
            device="cpu",
            cache_dir=tmp_path / "cache",
            host=HostConfig(sidecar_id="real", task_queue=sidecar_task_queue("real"), slots_total=1),
        )
    )
    activities = SidecarActivities(host, SidecarWorkerConfig.for_host(host, tmp_path / "assets"), "current")
    body = media.frames_zip()
    stored = tmp_path / "control-plane.zip"
    stored.write_bytes(body)
    request = PrepareAvatarInput(
        call=SidecarCall("s1", "current"),
        avatar=avatar("http://x", body, str(stored)),
        fetch=policy.assets.fetch,
    )
    env = ActivityEnvironment()
    beats: list[tuple[Any, ...]] = []
    env.on_heartbeat = lambda *details: beats.append(details)
    loop_errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: loop_errors.append(context))
    try:
        ready = await env.run(activities.prepare_avatar, request)
        await asyncio.sleep(0.1)  # progress callbacks scheduled from the lane thread have run
    finally:
        asyncio.get_running_loop().set_exception_handler(None)
        await host.close()
    assert ready.frame_count == 6 and not ready.cache_hit
    assert loop_errors == []
    progress = [details[0] for details in beats if details and isinstance(details[0], PrepareProgress)]
    assert progress and progress[-1].frames_done == progress[-1].frames_total == 6


async def test_steps_cut_short_by_worker_shutdown_say_the_sidecar_is_going_away(
    tmp_path: Path, policy: SessionPolicy
) -> None:
    """A run cancelled because this process stops must not read as the workflow's own cancel."""
    activities = make_activities(tmp_path)
    body = media.frames_zip()
    stored = tmp_path / "control-plane.zip"
    stored.write_bytes(body)
    call = SidecarCall("s1", "current")
    await ActivityEnvironment().run(
        activities.prepare_avatar,
        PrepareAvatarInput(
            call=call, avatar=avatar("http://x", body, str(stored)), fetch=policy.assets.fetch
        ),
    )
    # The test host probes RTMP with a real handshake: serve one on loopback.
    server = await asyncio.start_server(_rtmp_handshake, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        await ActivityEnvironment().run(
            activities.open_output,
            OpenOutputInput(
                call=call,
                spec=OutputSpec(RTMP.name, {"url": f"rtmp://127.0.0.1:{port}/live/s1"}),
                room="r",
                record=False,
                allow_networks=["127.0.0.1/32"],
            ),
        )
    run = RunSessionInput(
        call=call, idle_timeout_s=60, max_duration_s=60, stats_interval_s=0.05, stats_report_interval_s=60
    )

    async def cut_short(*, shutdown: bool) -> BaseException:
        reports = _SignalRecorder()
        env = ActivityEnvironment(client=reports)  # type: ignore[arg-type]
        task = asyncio.create_task(env.run(activities.run_session, run))
        await asyncio.sleep(0.3)
        assert not task.done() and [name for name, _ in reports.signals] == ["report_stats"]
        if shutdown:
            env.worker_shutdown()
        env.cancel()
        try:
            await task
        except BaseException as exc:  # which exception it is, is the point
            return exc
        raise AssertionError("run_session returned after its cancellation")

    cancelled = await cut_short(shutdown=False)
    assert isinstance(cancelled, asyncio.CancelledError)
    activities.host.sessions["s1"].stop_reason = None  # type: ignore[attr-defined]
    activities.host.sessions["s1"].stop_event.clear()  # type: ignore[attr-defined]
    going_away = await cut_short(shutdown=True)
    assert isinstance(going_away, ApplicationError)
    assert going_away.type == ErrorCode.SIDECAR_SHUTTING_DOWN.value and going_away.non_retryable


async def _rtmp_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readexactly(1 + 1536)  # C0 + C1
    writer.write(b"\x03" + bytes(1536) + bytes(1536))  # S0 + S1 + S2
    await writer.drain()
    await reader.read(1536)  # C2
    writer.close()


class _SignalRecorder:
    """Stands in for the Temporal client run_session signals its stats reports through."""

    def __init__(self) -> None:
        self.signals: list[tuple[str, Any]] = []

    def get_workflow_handle(self, workflow_id: str) -> _SignalRecorder:
        return self

    async def signal(self, name: str, arg: Any) -> None:
        self.signals.append((name, arg))
