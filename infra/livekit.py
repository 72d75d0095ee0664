"""livekit-server built from its Go module at a pinned tag, run `--dev` on loopback only.

Nothing may reach a non-loopback address: the server binds its HTTP/WS port and UDP mux to
127.0.0.1, advertises 127.0.0.1 as its only ICE candidate (`node_ip`, `ips.includes`), does
not discover an external IP, runs no TURN, and hands clients a STUN server on loopback instead
of the public default (clients would otherwise query Google's STUN servers). Its ICE/TCP
listener (`rtc.tcp_port`) is the exception: livekit-server binds it on every interface (it has
no address setting), so a reachable host must firewall that port.

Rooms sync their streams (`room.sync_streams`): a subscriber then gets every track a participant
published with the same `stream` under one media stream id (`<participant>|<stream>`), so receivers
that lip-sync by stream (libwebrtc's, in browsers and the native SDKs) hold the avatar's video to its
audio. Without it livekit-server gives each track its own stream id (`<participant>|<track>`) and no
receiver syncs them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from infra.paths import cache_dir
from infra.process import ManagedProcess, free_port, free_udp_port, http_ok
from realtime.errors import LipsyncError

LIVEKIT_SERVER_MODULE = "github.com/livekit/livekit-server/cmd/server"
LIVEKIT_SERVER_VERSION = "v1.13.5"
DEV_API_KEY = "devkey"
# livekit-server refuses secrets shorter than 32 characters outside --dev; keep one that works in both.
DEV_API_SECRET = "lipsync-live-dev-secret-0123456789abcdef"


class LiveKitBuildError(LipsyncError, RuntimeError):
    """livekit-server could not be built."""

    code = "livekit_build_failed"


def livekit_binary_path() -> Path:
    """Cached build of the pinned version; the version is in the path so a bump rebuilds."""
    return cache_dir() / "livekit-server" / LIVEKIT_SERVER_VERSION / "server"


def binary_version(binary: Path) -> str | None:
    """The version the binary reports (`server --version`), or None if it does not run."""
    try:
        result = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return None
    words = result.stdout.split()
    return words[-1] if result.returncode == 0 and words else None


def ensure_livekit_server() -> Path:
    """Build livekit-server with `go install` unless the pinned build is already cached (and runs)."""
    binary = livekit_binary_path()
    if binary.exists() and binary_version(binary) == LIVEKIT_SERVER_VERSION.lstrip("v"):
        return binary
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if go is None:
        raise LiveKitBuildError("Go toolchain not found: livekit-server is built from its Go module")
    binary.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOBIN": str(binary.parent), "CGO_ENABLED": os.environ.get("CGO_ENABLED", "1")}
    result = subprocess.run(
        [go, "install", f"{LIVEKIT_SERVER_MODULE}@{LIVEKIT_SERVER_VERSION}"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not binary.exists():
        raise LiveKitBuildError(f"go install livekit-server failed:\n{result.stderr[-4000:]}")
    return binary


@dataclass(frozen=True)
class LiveKitServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    rtc_tcp_port: int = 0
    rtc_udp_port: int = 0
    stun_port: int = 0  # nothing listens there: clients get a loopback STUN address, never a public one
    api_key: str = DEV_API_KEY
    api_secret: str = DEV_API_SECRET
    # Tracks published with the same `stream` share one stream id at subscribers, which lip-sync them.
    sync_streams: bool = True

    def with_free_ports(self) -> LiveKitServerConfig:
        return replace(
            self,
            port=self.port or free_port(self.host),
            rtc_tcp_port=self.rtc_tcp_port or free_port(self.host),
            rtc_udp_port=self.rtc_udp_port or free_udp_port(self.host),
            stun_port=self.stun_port or free_udp_port(self.host),
        )

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def to_yaml(self) -> str:
        document = {
            "port": self.port,
            "bind_addresses": [self.host],
            "keys": {self.api_key: self.api_secret},
            "rtc": {
                "tcp_port": self.rtc_tcp_port,
                "udp_port": self.rtc_udp_port,
                "use_external_ip": False,
                "node_ip": self.host,
                "enable_loopback_candidate": True,
                "ips": {"includes": [f"{self.host}/32"]},
                "stun_servers": [f"{self.host}:{self.stun_port}"],
                "turn_servers": [],
            },
            "turn": {"enabled": False},
            "room": {"sync_streams": self.sync_streams},
            "logging": {"level": "info", "json": False},
        }
        return yaml.safe_dump(document, sort_keys=False)


def server_process(config: LiveKitServerConfig, workdir: Path) -> ManagedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "livekit.yaml"
    config_path.write_text(config.to_yaml())
    argv = [
        str(ensure_livekit_server()),
        "--dev",
        "--config",
        str(config_path),
        "--bind",
        config.host,
        "--node-ip",
        config.host,
    ]
    return ManagedProcess(
        name="livekit",
        argv=argv,
        log_path=workdir / "livekit.log",
        health=lambda: http_ok(config.http_url),
        startup_timeout_s=30.0,
    )
