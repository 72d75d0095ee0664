"""Listener ports come from outside the kernel's ephemeral range (where client sockets take their local
ports), are free when handed out, and are not handed out twice in a row."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from infra import process
from infra.process import LISTEN_PORTS, ephemeral_ports, free_port, free_udp_port


def test_ports_are_free_outside_the_ephemeral_range_and_distinct() -> None:
    ephemeral = ephemeral_ports()
    tcp = [free_port() for _ in range(50)]
    udp = [free_udp_port() for _ in range(20)]
    ports = tcp + udp
    assert len(set(ports)) == len(ports)
    assert all(port in LISTEN_PORTS and port not in ephemeral for port in ports)
    for port in tcp[:5]:  # free: a listener binds it
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
            sock.listen()


def test_a_port_held_by_a_listener_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held_port = held.getsockname()[1]
        held.listen()
        # the held port is the only candidate
        monkeypatch.setattr(process, "LISTEN_PORTS", range(held_port, held_port + 1))
        monkeypatch.setattr(process, "_recent_ports", process.collections.deque(maxlen=512))
        monkeypatch.setattr(process, "ephemeral_ports", lambda: range(0))
        port = free_port()
    # every pick of the one candidate failed its bind probe: the OS picked one instead
    assert port != held_port


def test_the_ephemeral_range_is_read_from_the_kernel_setting(tmp_path: Path) -> None:
    setting = tmp_path / "ip_local_port_range"
    setting.write_text("40000\t50000\n")
    assert ephemeral_ports(setting) == range(40_000, 50_001)
    assert ephemeral_ports(tmp_path / "missing") == range(32_768, 61_000)
