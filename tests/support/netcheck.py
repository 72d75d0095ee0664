"""Evidence that a process talks to loopback only: its inet sockets (from /proc) and WebRTC ICE candidates."""

from __future__ import annotations

import ipaddress
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from livekit import rtc


@dataclass(frozen=True)
class InetSocket:
    protocol: str
    local: str
    remote: str


def _decode_address(hex_address: str) -> str:
    host_hex, port_hex = hex_address.split(":")
    raw = bytes.fromhex(host_hex)
    if len(raw) == 4:
        host = str(ipaddress.IPv4Address(raw[::-1]))
    else:
        # /proc stores IPv6 as four host-order 32-bit words.
        words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
        host = str(ipaddress.IPv6Address(b"".join(words)))
    return f"{host}:{int(port_hex, 16)}"


def _socket_table(pid: int) -> dict[int, InetSocket]:
    table: dict[int, InetSocket] = {}
    for protocol in ("tcp", "tcp6", "udp", "udp6"):
        path = Path(f"/proc/{pid}/net/{protocol}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            inode = int(fields[9])
            table[inode] = InetSocket(protocol, _decode_address(fields[1]), _decode_address(fields[2]))
    return table


def process_sockets(pid: int) -> list[InetSocket]:
    """The inet sockets that process `pid` holds open."""
    table = _socket_table(pid)
    sockets = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inode = int(target[len("socket:[") : -1])
            if inode in table:
                sockets.append(table[inode])
    return sockets


def host_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Addresses assigned to this host's own interfaces (packets to them never leave the machine)."""
    addresses: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    lines = Path("/proc/net/fib_trie").read_text().splitlines()
    for previous, line in itertools.pairwise(lines):
        if "/32 host LOCAL" in line:
            addresses.add(ipaddress.IPv4Address(previous.split()[-1]))
    if_inet6 = Path("/proc/net/if_inet6")
    if if_inet6.exists():
        for line in if_inet6.read_text().splitlines():
            addresses.add(ipaddress.IPv6Address(bytes.fromhex(line.split()[0])))
    return addresses


def stays_on_host(address: str) -> bool:
    """True for loopback, unset (unconnected socket) and this host's own addresses.

    WebRTC clients gather host candidates on every interface, so a client socket bound to
    the host's eth0 address may talk to the server's 127.0.0.1 candidate: the kernel
    delivers that over the loopback device, and nothing leaves the machine.
    """
    host = address.rsplit(":", 1)[0]
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified or ip in host_addresses()


def off_host_peers(pid: int) -> list[InetSocket]:
    """Sockets of `pid` connected to an address off this machine (should always be empty here)."""
    return [sock for sock in process_sockets(pid) if not stays_on_host(sock.remote)]


async def ice_remote_addresses(room: rtc.Room) -> set[str]:
    """Every remote ICE candidate address of the room's peer connections: where WebRTC may send."""
    stats = await room.get_rtc_stats()
    addresses = set()
    for entry in [*stats.publisher_stats, *stats.subscriber_stats]:
        if entry.WhichOneof("stats") == "remote_candidate":
            addresses.add(entry.remote_candidate.candidate.address)
    return addresses
