"""The output URL SSRF guard (RTMP's): caller URLs may not point a sidecar inside its network."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.errors import AssetError
from activities.output_guard import checked_output_url
from activities.sidecar import SidecarActivities, SidecarWorkerConfig
from realtime.outputs.registry import RTMP, RTMP_URL_GUARD
from tests.support.session_host import LoopbackSessionHost
from workflows.contracts import (
    ErrorCode,
    OpenOutputInput,
    OutputSpec,
    SidecarCall,
    sidecar_task_queue,
)


@pytest.mark.parametrize(
    ("url", "allow"),
    [
        ("rtmp://127.0.0.1:1935/live/key", []),
        ("rtmp://localhost/live/key", []),
        ("rtmp://10.1.2.3/live/key", []),
        ("rtmp://[::ffff:127.0.0.1]/live/key", []),
        ("rtmp://[2002:7f00:1::1]/live/key", []),  # 6to4 carrying 127.0.0.1
        ("rtmps://192.168.1.20/live/key", []),
        ("rtmp://169.254.169.254:80/live/key", ["169.254.0.0/16"]),  # metadata needs an exact entry
        ("rtmp://10.1.2.3/live/key", ["127.0.0.0/8"]),
    ],
)
async def test_private_loopback_and_metadata_targets_are_refused(url: str, allow: list[str]) -> None:
    with pytest.raises(AssetError) as refused:
        await checked_output_url(url, RTMP_URL_GUARD, allow)
    assert refused.value.code is ErrorCode.URL_FORBIDDEN_ADDRESS
    assert "not allow-listed" in refused.value.message


@pytest.mark.parametrize("url", ["http://example.com/live/key", "rtmp://host-only", "rtmp:///live/key"])
async def test_malformed_rtmp_urls_are_url_invalid(url: str) -> None:
    with pytest.raises(AssetError) as refused:
        await checked_output_url(url, RTMP_URL_GUARD, [])
    assert refused.value.code is ErrorCode.URL_INVALID


async def test_allowed_names_are_pinned_to_the_checked_address() -> None:
    # rtmp:// is pinned (no second resolution by the encoder); the path and port are kept.
    assert await checked_output_url(
        "rtmp://localhost:1935/live/key?x=1", RTMP_URL_GUARD, ["127.0.0.1/32", "::1/128"]
    ) in {
        "rtmp://127.0.0.1:1935/live/key?x=1",
        "rtmp://[::1]:1935/live/key?x=1",
    }
    assert (
        await checked_output_url("rtmp://8.8.8.8/live/key", RTMP_URL_GUARD, []) == "rtmp://8.8.8.8/live/key"
    )
    assert (
        await checked_output_url("rtmp://10.1.2.3/app/k", RTMP_URL_GUARD, ["10.0.0.0/8"])
        == "rtmp://10.1.2.3/app/k"
    )
    # rtmps:// keeps its name (TLS needs it for SNI).
    assert (
        await checked_output_url("rtmps://127.0.0.1/live/key", RTMP_URL_GUARD, ["127.0.0.1/32"])
        == "rtmps://127.0.0.1/live/key"
    )


async def test_open_output_refuses_a_forbidden_rtmp_target_before_the_host_connects(tmp_path: Path) -> None:
    host = LoopbackSessionHost("t", sidecar_task_queue("t"), 2, tmp_path / "cache")
    activities = SidecarActivities(
        host, SidecarWorkerConfig.for_host(host, tmp_path / "assets"), incarnation="now"
    )
    request = OpenOutputInput(
        call=SidecarCall("s1", incarnation="now"),
        spec=OutputSpec(RTMP.name, {"url": "rtmp://169.254.169.254/live/s1"}),
        room="r",
        record=False,
    )
    with pytest.raises(ApplicationError) as refused:
        await ActivityEnvironment().run(activities.open_output, request)
    assert refused.value.type == ErrorCode.URL_FORBIDDEN_ADDRESS.value and refused.value.non_retryable
