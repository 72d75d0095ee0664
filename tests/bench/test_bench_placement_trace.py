"""bench.placement_trace end to end at a tiny size: every acquire update it records is found in its
registry's history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.module_run import run_module


@pytest.mark.service
def test_the_trace_lines_every_acquire_update_up_with_its_registry_history(tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    result = run_module(
        "bench.placement_trace",
        [
            "--sidecars",
            "4",
            "--shards",
            "2",
            "--control-workers",
            "2",
            "--rate",
            "5",
            "--level-s",
            "2",
            "--registration-interval-s",
            "1",
            "--lease-s",
            "5",
            # every attempt counts as slow: each one is attributed
            "--slow-ms",
            "0",
            "--json",
            str(out),
        ],
        timeout_s=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    traced = json.loads(out.read_text())["result"]
    assert traced["acquires"] == 10 and traced["failures"] == []
    calls = traced["slow_update_calls"]
    assert len(calls) == traced["update_calls"] >= 1
    # Answered updates were accepted by a workflow task of a registry run the trace read back.
    answered = [call for call in calls if not call["error"]]
    assert answered and all("run_index" in call and call["task_start_to_end_ms"] >= 0 for call in answered)
    assert {call["registry"] for call in answered} <= set(traced["registries"])
    assert all(
        registry["runs"] >= 1 and registry["workflow_tasks"] >= 1
        for registry in traced["registries"].values()
    )
    assert traced["replay_ms_by_run_events"] and all(ms > 0 for _, ms in traced["replay_ms_by_run_events"])
