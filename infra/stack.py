"""The embedded local stack (`lipsync stack up|down|status`): Temporal + UI, livekit-server, nginx-rtmp.

Services are started detached (own process group) so they outlive the CLI call; their pids
and ports go to a state file so `status` and `down` find them again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from infra import livekit, rtmp, temporal
from infra.paths import state_dir
from infra.process import (
    ManagedProcess,
    free_port,
    free_udp_port,
    http_ok,
    pid_alive,
    stop_process_group,
    tcp_port_open,
)
from realtime.errors import LipsyncError

logger = logging.getLogger(__name__)

STATE_FILE_NAME = "stack.json"


@dataclass(frozen=True)
class StackPorts:
    """The stack's loopback ports: each service's defaults, or all free ones (`free()`) for a second stack."""

    temporal: int = 7233  # frontend gRPC: workers, the API, the temporal CLI
    temporal_ui: int = 8233  # the web UI (workflow histories)
    temporal_http: int = 7243  # HTTP API
    temporal_metrics: int = 7244  # Prometheus
    livekit: int = 7880  # signalling (WebSocket) + RoomService
    livekit_rtc_tcp: int = 7881  # ICE over TCP
    livekit_rtc_udp: int = 7882  # ICE over UDP (one muxed port)
    livekit_stun: int = 7883  # the STUN server pinned to loopback
    rtmp: int = 1935  # nginx-rtmp ingest
    rtmp_http: int = 8089  # nginx's HTTP side: /stat for health checks

    @classmethod
    def free(cls) -> StackPorts:
        return cls(
            temporal=free_port(),
            temporal_ui=free_port(),
            temporal_http=free_port(),
            temporal_metrics=free_port(),
            livekit=free_port(),
            livekit_rtc_tcp=free_port(),
            livekit_rtc_udp=free_udp_port(),
            livekit_stun=free_udp_port(),
            rtmp=free_port(),
            rtmp_http=free_port(),
        )


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    running: bool
    healthy: bool
    endpoint: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class StackState:
    ports: StackPorts
    pids: dict[str, int]

    def save(self, directory: Path) -> None:
        payload = {"ports": asdict(self.ports), "pids": self.pids}
        (directory / STATE_FILE_NAME).write_text(json.dumps(payload, indent=2))

    @classmethod
    def load(cls, directory: Path) -> StackState | None:
        path = directory / STATE_FILE_NAME
        if not path.exists():
            return None
        payload = json.loads(path.read_text())
        return cls(ports=StackPorts(**payload["ports"]), pids={k: int(v) for k, v in payload["pids"].items()})


def temporal_config(ports: StackPorts, directory: Path) -> temporal.TemporalDevServerConfig:
    return temporal.TemporalDevServerConfig(
        port=ports.temporal,
        ui_port=ports.temporal_ui,
        http_port=ports.temporal_http,
        metrics_port=ports.temporal_metrics,
        db_file=directory / "temporal.sqlite",
    )


def livekit_config(ports: StackPorts) -> livekit.LiveKitServerConfig:
    return livekit.LiveKitServerConfig(
        port=ports.livekit,
        rtc_tcp_port=ports.livekit_rtc_tcp,
        rtc_udp_port=ports.livekit_rtc_udp,
        stun_port=ports.livekit_stun,
    )


def rtmp_config(ports: StackPorts) -> rtmp.RtmpServerConfig:
    return rtmp.RtmpServerConfig(rtmp_port=ports.rtmp, http_port=ports.rtmp_http)


def _processes(ports: StackPorts, directory: Path, *, detached: bool) -> dict[str, ManagedProcess]:
    processes = {
        "temporal": temporal.dev_server_process(
            temporal_config(ports, directory), directory / "temporal.log"
        ),
        "livekit": livekit.server_process(livekit_config(ports), directory / "livekit"),
        "nginx-rtmp": rtmp.server_process(rtmp_config(ports), directory / "nginx"),
    }
    for process in processes.values():
        process.die_with_parent = not detached
    return processes


def service_process(name: str, ports: StackPorts, directory: Path) -> ManagedProcess:
    """One of the stack's services ("temporal", "livekit", "nginx-rtmp") as a process to (re)start, tethered
    to its starter (e.g. a benchmark restarting a service it killed; Temporal keeps its database file)."""
    return _processes(ports, directory, detached=False)[name]


def service_env(ports: StackPorts) -> dict[str, str]:
    """How `lipsync api/worker/sidecar` processes reach this stack's Temporal and LiveKit (environment
    variables)."""
    return {
        "TEMPORAL_ADDRESS": f"127.0.0.1:{ports.temporal}",
        "LIVEKIT_URL": f"ws://127.0.0.1:{ports.livekit}",
        "LIVEKIT_API_KEY": livekit.DEV_API_KEY,
        "LIVEKIT_API_SECRET": livekit.DEV_API_SECRET,
    }


def _endpoints(ports: StackPorts) -> dict[str, str]:
    return {
        "temporal": f"grpc 127.0.0.1:{ports.temporal}, UI http://127.0.0.1:{ports.temporal_ui}",
        "livekit": f"ws://127.0.0.1:{ports.livekit} (key {livekit.DEV_API_KEY})",
        "nginx-rtmp": f"rtmp://127.0.0.1:{ports.rtmp}/{rtmp.RTMP_APPLICATION}/<stream>",
    }


def _health(ports: StackPorts, directory: Path) -> dict[str, bool]:
    lk = livekit_config(ports)
    tc = temporal_config(ports, directory)
    rc = rtmp_config(ports)
    return {
        "temporal": tcp_port_open(tc.host, tc.port)
        and http_ok(f"http://{tc.host}:{tc.http_port}/api/v1/namespaces/{temporal.NAMESPACE}")
        and http_ok(tc.ui_url),
        "livekit": http_ok(lk.http_url),
        "nginx-rtmp": tcp_port_open(rc.host, rc.rtmp_port) and http_ok(rc.stat_url),
    }


class StackError(LipsyncError, RuntimeError):
    """The local stack could not be started, found or stopped."""

    code = "stack_failed"


def up(
    ports: StackPorts | None = None, directory: Path | None = None, *, detached: bool = False
) -> list[ServiceStatus]:
    """Start the stack. detached: it outlives this process (`lipsync stack up`, on purpose, until
    `lipsync stack down`); otherwise it dies with this process however that ends (e.g. `lipsync demo`)."""
    directory = directory or state_dir()
    existing = StackState.load(directory)
    if existing and any(pid_alive(pid) for pid in existing.pids.values()):
        raise StackError("the stack is already running: `lipsync stack status` or `lipsync stack down`")
    ports = ports or StackPorts()
    started: dict[str, int] = {}
    try:
        for name, proc in _processes(ports, directory, detached=detached).items():
            proc.start()
            assert proc.pid is not None
            started[name] = proc.pid
            StackState(ports=ports, pids=started).save(directory)
    except Exception:
        for pid in started.values():
            stop_process_group(pid)
        (directory / STATE_FILE_NAME).unlink(missing_ok=True)
        raise
    return status(directory)


def status(directory: Path | None = None) -> list[ServiceStatus]:
    directory = directory or state_dir()
    state = StackState.load(directory)
    ports = state.ports if state else StackPorts()
    pids = state.pids if state else {}
    health = _health(ports, directory)
    endpoints = _endpoints(ports)
    return [
        ServiceStatus(
            name=name,
            pid=pids.get(name),
            running=pids.get(name) is not None and pid_alive(pids[name]),
            healthy=health[name],
            endpoint=endpoints[name],
        )
        for name in ("temporal", "livekit", "nginx-rtmp")
    ]


def down(directory: Path | None = None) -> list[str]:
    directory = directory or state_dir()
    state = StackState.load(directory)
    if state is None:
        return []
    stopped = []
    for name, pid in state.pids.items():
        if pid_alive(pid):
            stop_process_group(pid)
            stopped.append(name)
    (directory / STATE_FILE_NAME).unlink(missing_ok=True)
    return stopped
