"""bench.sessions reports the collector's pauses and the event loop's stalls per level, and freezes the loaded
heap as the sidecar does (realtime.heap) unless told not to."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.sessions import STALL_MS, _probe_loop_lag, main
from tests.support.heap_state import unfrozen_heap


@pytest.fixture(autouse=True)
def _nothing_frozen() -> Iterator[None]:
    with unfrozen_heap():
        yield


async def test_the_loop_probe_records_when_a_stall_ended_and_how_long_it_was() -> None:
    samples_ms: list[float] = []
    stalls: list[tuple[float, float]] = []
    probe = asyncio.create_task(_probe_loop_lag(samples_ms, stalls))
    await asyncio.sleep(0.05)
    time.sleep(STALL_MS * 1.5 / 1000)  # noqa: ASYNC251 (the point: the loop blocked, as by a full collection)
    blocked_until = time.monotonic()
    await asyncio.sleep(0.05)
    probe.cancel()
    assert len(stalls) == 1
    ended_s, stall_ms = stalls[0]
    assert stall_ms >= STALL_MS
    assert blocked_until <= ended_s <= blocked_until + 0.05
    assert max(samples_ms) == stall_ms


@pytest.mark.parametrize("freeze", [True, False])
def test_each_level_reports_collections_and_the_run_says_whether_the_heap_was_frozen(
    tmp_path: Path, freeze: bool
) -> None:
    out = tmp_path / "sessions.json"
    argv = [
        "--engine",
        "preview",
        "--sessions",
        "2",
        "--levels",
        "2",
        "--duration-s",
        "1",
        "--json",
        str(out),
    ]
    assert main([*argv, *([] if freeze else ["--no-gc-freeze"])]) == 0
    document = json.loads(out.read_text())
    settings = document["settings"]
    assert settings["gc_freeze"] is freeze
    assert (settings["gc_frozen_objects"] > 0) is freeze
    (row,) = document["results"]
    assert len(row["gc_collections_by_generation"]) == 3
    assert len(row["gc_pause_ms_max_by_generation"]) == 3
    assert isinstance(row["gc_long_pauses"], list) and isinstance(row["loop_stalls"], list)
    assert row["loop_lag_ms_max"] >= row["loop_lag_ms_p99"]
    assert (row["gc_frozen_objects"] > 0) is freeze
    # a 1 s level: each session's one utterance starts on an idle session, a turn
    assert row["turn_utterances"] == row["utterances"] == 2
    assert row["turn_ttff_ms_p99"] == row["ttff_ms_p99"]
