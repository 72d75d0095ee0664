"""Start, probe and stop the local services (Temporal, livekit-server, nginx) as child processes.

Each service runs in its own process group so that stopping it also stops whatever it
forked (nginx workers, the Temporal UI server): nothing is left running after a test
session or `lipsync stack down`.

A service also dies with the process that started it, however that one ends (SIGTERM from
a `timeout`, SIGKILL, a crash): the kernel sends it SIGTERM when its starter is gone
(PR_SET_PDEATHSIG). Only `lipsync stack up` starts services meant to outlive it
(`die_with_parent=False`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from realtime.errors import LipsyncError

logger = logging.getLogger(__name__)


# prctl(2): PR_SET_PDEATHSIG delivers a signal to this process when the THREAD that forked it ends.
_PR_SET_PDEATHSIG = 1
# So services are forked from one thread that lives as long as this process: a service started from a
# short-lived thread (asyncio.to_thread) would otherwise be killed when that thread retires.
_spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="service-spawner")


# Resolved here, in the parent: the child may only call it (loading a library after fork can deadlock).
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """preexec_fn (runs in the child, between fork and exec): SIGTERM this process when its starter dies."""
    assert _prctl is not None
    if _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        os._exit(126)  # the service must not run without its tether
    if os.getppid() == 1:
        # The starter died between fork and prctl: the signal will never come, so go now.
        os._exit(1)


def spawn(
    argv: Sequence[str],
    *,
    log: IO[bytes],
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    die_with_parent: bool = True,
) -> subprocess.Popen[bytes]:
    """Start `argv` in a new session (its own process group), output to `log`, stdin closed.

    With die_with_parent (Linux) it gets SIGTERM when this process ends, however it ends.
    """

    def popen() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            # Only prctl and getppid run between fork and exec, through a function resolved before the fork.
            preexec_fn=_die_with_parent if tethered else None,  # noqa: PLW1509
        )

    tethered = die_with_parent and _prctl is not None
    if not tethered:
        return popen()
    return _spawner.submit(popen).result()


class ServiceStartError(LipsyncError, RuntimeError):
    """A service did not become healthy; the message carries the tail of its log."""

    code = "service_start_failed"


# Ports handed out for listeners come from below the kernel's ephemeral range: the OS gives outgoing
# connections their local ports from that range, so a port it picked for us (bind to port 0) could be taken
# by any client socket between our pick and the service's bind ("address already in use" at a service's
# start-up, seen in CI). A port outside it can be taken only by another listener, which the bind probe sees.
LISTEN_PORTS = range(20_000, 32_768)
_recent_ports: collections.deque[int] = collections.deque(maxlen=512)  # not handed out twice in a row
_port_random = random.Random()


def ephemeral_ports(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> range:
    """The kernel's range for outgoing connections' local ports (Linux's default where it cannot be read)."""
    try:
        low, high = (int(value) for value in path.read_text().split())
    except (OSError, ValueError):
        low, high = 32_768, 60_999
    return range(low, high + 1)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now, outside the ephemeral range (see `LISTEN_PORTS`)."""
    return _free_listen_port(host, socket.SOCK_STREAM)


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port free on `host` right now, outside the ephemeral range (see `LISTEN_PORTS`)."""
    return _free_listen_port(host, socket.SOCK_DGRAM)


def _free_listen_port(host: str, kind: socket.SocketKind, attempts: int = 200) -> int:
    ephemeral = ephemeral_ports()
    candidates = [port for port in LISTEN_PORTS if port not in ephemeral]
    for _ in range(attempts if candidates else 0):
        port = _port_random.choice(candidates)
        if port in _recent_ports:
            continue
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue  # a listener (or a lingering connection) holds it
        _recent_ports.append(port)
        return port
    # The ephemeral range covers ours (an unusual kernel setting), or everything there is taken: the OS picks.
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        port = int(sock.getsockname()[1])
    _recent_ports.append(port)
    return port


def tcp_port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    """True when `url` answers 2xx (used for readiness, so errors just mean "not yet")."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 200 <= int(response.status) < 300
    except (OSError, ValueError):
        return False


def log_tail(path: Path, max_lines: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-max_lines:])


def wait_until(probe: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if probe():
            return True
        time.sleep(interval_s)
    return probe()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); read its state to tell.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def pin_threads(pid: int, cores: set[int]) -> dict[int, set[int]]:
    """Put every current thread of `pid` on `cores` (threads they start later inherit it); returns each
    thread's previous cores, for `restore_threads`. A thread that ended meanwhile is skipped. Linux only.

    Used to model a deployment on one host: processes that stand in for other machines (a subscriber,
    livekit-server) are kept off the cores of the process under test."""
    previous: dict[int, set[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        tid = int(task.name)
        with contextlib.suppress(ProcessLookupError):
            previous[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cores)
    return previous


def restore_threads(pid: int, previous: dict[int, set[int]]) -> None:
    """Undo `pin_threads`: every thread of `pid` back on its previous cores; threads started since get the
    cores the process had (the union of the previous masks)."""
    everywhere = set().union(*previous.values()) if previous else set(range(os.cpu_count() or 1))
    for task in Path(f"/proc/{pid}/task").iterdir():
        tid = int(task.name)
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(tid, previous.get(tid, everywhere))


def stop_process_group(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM the process group led by `pid`, then SIGKILL what is left after `timeout_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        if wait_until(lambda: not _group_alive(pid), timeout_s if sig == signal.SIGTERM else 5.0):
            return
    logger.warning("process group still alive after SIGKILL", extra={"pid": pid})


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # fields: state ppid pgrp ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


@dataclass
class ManagedProcess:
    """One service process: its command, where it logs, and how to tell it is healthy."""

    name: str
    argv: Sequence[str]
    log_path: Path
    health: Callable[[], bool]
    cwd: Path | None = None
    env: dict[str, str] | None = None
    startup_timeout_s: float = 60.0
    # False only for services meant to outlive their starter (`lipsync stack up`)
    die_with_parent: bool = True
    _popen: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    @property
    def returncode(self) -> int | None:
        """The exit status once it exited (negative: the signal that ended it), else None."""
        return self._popen.poll() if self._popen else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("starting service", extra={"service": self.name, "argv": list(self.argv)})
        with self.log_path.open("ab") as log:
            self._popen = spawn(
                self.argv,
                log=log,
                cwd=self.cwd,
                env={**os.environ, **(self.env or {})},
                die_with_parent=self.die_with_parent,
            )
        popen = self._popen

        def healthy_or_dead() -> bool:
            return popen.poll() is not None or self.health()

        wait_until(healthy_or_dead, self.startup_timeout_s, interval_s=0.2)
        if popen.poll() is not None:
            raise ServiceStartError(
                f"{self.name} exited with code {popen.returncode} during start-up; "
                f"log {self.log_path}:\n{log_tail(self.log_path)}"
            )
        if not self.health():
            self.stop()
            raise ServiceStartError(
                f"{self.name} was not healthy after {self.startup_timeout_s:.0f} s; "
                f"log {self.log_path}:\n{log_tail(self.log_path)}"
            )

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def stop(self) -> None:
        if self._popen is None:
            return
        stop_process_group(self._popen.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=5)
        logger.info("stopped service", extra={"service": self.name})
