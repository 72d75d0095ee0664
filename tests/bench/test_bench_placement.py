"""bench.placement end to end at a tiny size (its own dev server, 4 sidecars, two 1-s levels) and its
arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.placement import _pct
from tests.support.module_run import run_module


def test_percentiles_interpolate_between_ranks_like_numpy() -> None:
    assert _pct([], 99) is None
    assert _pct([5.0], 99) == 5.0
    assert _pct([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert _pct([float(v) for v in range(101)], 99) == 99.0


@pytest.mark.service
def test_the_benchmark_runs_against_a_real_server_and_writes_the_named_figures(tmp_path: Path) -> None:
    out = tmp_path / "placement.json"
    result = run_module(
        "bench.placement",
        [
            "--sidecars",
            "4",
            "--shards",
            "2",
            "--rates",
            "4",
            "8",
            "--level-s",
            "1",
            "--hold-s",
            "0.2",
            "--registration-interval-s",
            "1",
            "--lease-s",
            "5",
            "--control-workers",
            "2",
            "--profile-histories",
            "--json",
            str(out),
        ],
        timeout_s=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(out.read_text())
    assert document["benchmark"] == "placement"
    summary = document["summary"]
    named = {"sidecars", "starts_per_s_sustained", "acquire_ms_p50", "acquire_ms_p99", "updates_per_s_max"}
    assert named <= set(summary)
    (run,) = document["results"]
    assert run["sidecars"] == 4 and run["shards"] == 2 and len(run["levels"]) >= 1
    first = run["levels"][0]
    # Every start was placed and released, and a place names why: the fleet has room by construction.
    assert first["acquires_ok"] == first["releases_ok"] == 4 and first["failures"] == {}
    assert sum(first["placement_reasons"].values()) == 4
    assert set(first["cpu_cores"]) == {"server", "registry_workers", "driver"}
    # Batching is reported: every acquire went in some update, every release in some signal.
    assert first["acquires_per_update"] >= 1.0 and first["releases_per_signal"] >= 1.0
    profile = run["history_profile"]
    assert profile["registry_runs"] >= 1 and profile["requests"]["acquires"] >= 4
    assert profile["events_by_type"]["workflow_execution_update_accepted"] >= 1
    assert profile["workflow_tasks_per_request"] > 0 and profile["events_per_request"] > 0
