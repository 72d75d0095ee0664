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

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Instance metadata endpoints (AWS/GCP/Azure/OpenStack, AWS ECS and its IPv6 form, Alibaba, Oracle).
# Most are link-local anyway; listing them keeps them refused even inside an allow-listed network.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(text)
    for text in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)


@dataclass(frozen=True)
class AddressPolicy:
    allow_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_cidrs(cls, cidrs: list[str]) -> AddressPolicy:
        return cls(tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs))


def forbidden_category(address: IPAddress) -> str | None:
    """Why an address is not public ("loopback", "private", ...), or None for a public one."""
    address = _unwrap(address)
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_private:
        return "private"
    if address.is_multicast:
        return "multicast"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:
        return "non-global"
    return None


def check_address(address: IPAddress, policy: AddressPolicy, *, code: ErrorCode, what: str) -> None:
    """Raise AssetError(code) unless `address` is public or allow-listed."""
    category = forbidden_category(address)
    if category is None:
        return
    plain = _unwrap(address)
    if category == "cloud metadata":
        # Only an entry naming exactly this address lets it through, never a broad range.
        allowed = any(net.num_addresses == 1 and plain in net for net in policy.allow_networks)
    else:
        allowed = any(plain in net for net in policy.allow_networks)
    if not allowed:
        raise AssetError(code, f"{what} resolves to {address} ({category}), which is not allow-listed")


async def resolve_checked(host: str, port: int, policy: AddressPolicy, *, code: ErrorCode, what: str) -> IPAddress:
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


def _unwrap(address: IPAddress) -> IPAddress:
    """IPv6 forms that carry an IPv4 address (mapped, 6to4, Teredo) are judged by that address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address.teredo is not None:
            return address.teredo[1]
    return address
