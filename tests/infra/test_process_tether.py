"""Nothing outlives its owner: services die with the process that started them, however it ends.

A starter process brings up the real Temporal dev server and nginx-rtmp exactly as the test
fixtures, `lipsync demo` and `lipsync stack` do (`infra.process.ManagedProcess`), then is
killed from outside: SIGTERM (what CI's `timeout` sends) or SIGKILL. Python runs no cleanup
for either, so only the services' parent-death tether can end them. `lipsync stack up` is the
exception on purpose (tests/infra/test_stack_cli.py: its services outlive the command).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from infra.paths import PROJECT_ROOT
from infra.process import pid_alive

pytestmark = pytest.mark.service

STARTER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from infra import rtmp, temporal

    workdir = Path(sys.argv[1])
    services = [
        rtmp.server_process(rtmp.RtmpServerConfig().with_free_ports(), workdir / "nginx"),
        temporal.dev_server_process(
            temporal.TemporalDevServerConfig().with_free_ports(), workdir / "temporal.log"
        ),
    ]
    for service in services:
        service.start()
    print("READY", *(service.pid for service in services), flush=True)
    time.sleep(600)
    """
)
STARTUP_S = 120.0  # Temporal's first start on two busy cores
GONE_WITHIN_S = 10.0


@pytest.mark.parametrize("kill_signal", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_services_die_with_their_starter(tmp_path: Path, kill_signal: signal.Signals) -> None:
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tmp_path)],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "starter.log").open("wb"),
        text=True,
    )
    pids: list[int] = []
    try:
        assert starter.stdout is not None
        deadline = time.monotonic() + STARTUP_S
        line = starter.stdout.readline()  # blocks until READY (or the starter died: "")
        assert time.monotonic() < deadline and line.startswith("READY"), (
            line,
            (tmp_path / "starter.log").read_text()[-3000:],
        )
        pids = [int(pid) for pid in line.split()[1:]]
        assert len(pids) == 2 and all(pid_alive(pid) for pid in pids)

        os.kill(starter.pid, kill_signal)
        starter.wait(timeout=10)
        deadline = time.monotonic() + GONE_WITHIN_S
        while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [pid for pid in pids if pid_alive(pid)]
        assert survivors == [], f"still running after the starter got {kill_signal.name}: {survivors}"
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()
        for pid in pids:  # never leave them behind, even when the test fails
            if pid_alive(pid):
                os.killpg(pid, signal.SIGKILL)
