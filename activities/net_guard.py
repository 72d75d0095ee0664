"""SSRF guard for asset downloads: only public addresses, unless an allow-list names the network.

An avatar URL comes from a caller; fetched naively it could read the cloud metadata service,
an internal admin port or the worker's own loopback. Every host (the first URL and every
redirect hop) is resolved here, every resolved address must pass, and the download then
connects to a checked address (the name is not resolved again, so DNS rebinding between
check and connect cannot switch the target).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

from activities.errors import AssetError
from workflows.contracts import ErrorCode
from workflows.net_addresses import IPAddress, IPNetwork, parse_networks, refusal


@dataclass(frozen=True)
class AddressPolicy:
    allow_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_cidrs(cls, cidrs: list[str]) -> AddressPolicy:
        return cls(parse_networks(cidrs))


def check_address(address: IPAddress, policy: AddressPolicy, *, code: ErrorCode, what: str) -> None:
    """Raise AssetError(code) unless `address` is public or allow-listed."""
    category = refusal(address, policy.allow_networks)
    if category is not None:
        raise AssetError(code, f"{what} resolves to {address} ({category}), which is not allow-listed")


async def resolve_checked(
    host: str,
    port: int,
    policy: AddressPolicy,
    *,
    code: ErrorCode,
    what: str,
) -> IPAddress:
    """Resolve `host`, check every address it has, and return the one to connect to."""
    addresses = await _resolve(host, port, what)
    for address in addresses:
        check_address(address, policy, code=code, what=what)
    return addresses[0]


async def _resolve(host: str, port: int, what: str) -> list[IPAddress]:
    literal = host.strip("[]")
    try:
        return [ipaddress.ip_address(literal)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(literal, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        message = f"{what}: cannot resolve {host!r}: {exc}"
        raise AssetError(ErrorCode.ASSET_UNREACHABLE, message, retryable=True) from exc
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise AssetError(ErrorCode.ASSET_UNREACHABLE, f"{what}: {host!r} has no address", retryable=True)
    return addresses
