"""`lipsync stack up|status|down` brings the three services up healthy and leaves nothing running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.process import pid_alive

pytestmark = pytest.mark.service


def _lipsync(*args: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LIPSYNC_STATE_DIR": str(state_dir)}
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def test_stack_up_status_down(tmp_path: Path) -> None:
    up = _lipsync("stack", "up", "--free-ports", state_dir=tmp_path)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        status = _lipsync("stack", "status", "--json", state_dir=tmp_path)
        assert status.returncode == 0, status.stdout + status.stderr
        rows = json.loads(status.stdout)
        assert {row["name"] for row in rows} == {"temporal", "livekit", "nginx-rtmp"}
        assert all(row["healthy"] and row["running"] for row in rows), rows
        pids = [row["pid"] for row in rows]
    finally:
        down = _lipsync("stack", "down", state_dir=tmp_path)
    assert down.returncode == 0, down.stderr
    assert all(not pid_alive(pid) for pid in pids)
    # No stray children either (nginx workers, the Temporal UI): their process groups are empty.
    assert all(_group_members(pid) == [] for pid in pids)
    after = _lipsync("stack", "status", state_dir=tmp_path)
    assert after.returncode == 1
    assert "stopped" in after.stdout
