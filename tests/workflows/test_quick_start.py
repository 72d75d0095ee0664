"""The start path's overlapped steps: warm_up runs beside prepare_avatar, and the first failure ends both."""

from __future__ import annotations

import pytest

from infra.rtmp import RtmpServerConfig
from realtime.outputs.registry import RtmpTarget
from tests.support import media
from tests.support.asset_server import AssetServer
from tests.support.outputs import output_request
from tests.support.temporal_harness import Harness, failed_with
from workflows.contracts import ErrorCode

pytestmark = pytest.mark.service


async def test_warm_up_failing_mid_prepare_cancels_prepare_and_tears_down(
    harness: Harness, rtmp_server: RtmpServerConfig, asset_server: AssetServer
) -> None:
    # A fresh avatar and a slow host: prepare_avatar takes seconds, warm_up fails at once beside it.
    url = asset_server.serve("/avatars/slow-prepare-warm-fails.zip", media.frames_zip(count=12, side_px=112))
    host = await harness.add_sidecar(
        "gpu0", prepare_frame_delay_s=0.25, warm_up_error="no device memory left"
    )
    request = harness.request(url, output_request(rtmp=RtmpTarget(url=rtmp_server.publish_url("warm-fails"))))
    handle = await harness.start(request)
    _, status = await failed_with(handle, ErrorCode.SIDECAR_ERROR)
    assert status.error is not None and "no device memory left" in status.error.message
    assert status.avatar is None  # prepare never finished: it was cancelled, not waited out
    assert request.session_id in host.torn_down and not host.sessions and status.teardown_errors == []
    history = await handle.fetch_history()
    scheduled = {
        e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    }
    cancelled = [
        scheduled[e.activity_task_canceled_event_attributes.scheduled_event_id]
        for e in history.events
        if e.HasField("activity_task_canceled_event_attributes")
    ]
    assert cancelled == ["prepare_avatar"]
    assert "open_output" not in scheduled.values() and "run_session" not in scheduled.values()
    assert [r.sessions for r in (await harness.snapshot()).sidecars] == [[]]  # slot released
