"""The pinned livekit-server build is cached: a second ensure does not rebuild it."""

from __future__ import annotations

import pytest

from infra import livekit

pytestmark = pytest.mark.service


def test_second_ensure_reuses_the_cached_build() -> None:
    first = livekit.ensure_livekit_server()
    mtime_ns = first.stat().st_mtime_ns
    second = livekit.ensure_livekit_server()
    assert second == first
    assert second.stat().st_mtime_ns == mtime_ns
    assert livekit.LIVEKIT_SERVER_VERSION in str(second)
    assert livekit.binary_version(second) == livekit.LIVEKIT_SERVER_VERSION.lstrip("v")
