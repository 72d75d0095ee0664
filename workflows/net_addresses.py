"""Which IP addresses a caller's URL may reach: shared by the API's pre-check and the SSRF guards.

Pure stdlib (no I/O), so the API (which may import only workflows) and the activities judge
an address the same way: public addresses pass; loopback, private, link-local, metadata and
other non-global ones pass only when an allow-listed network holds them.
"""

from __future__ import annotations

import ipaddress
import re
import socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Instance metadata endpoints (AWS/GCP/Azure/OpenStack, AWS ECS and its IPv6 form, Alibaba, Oracle).
# Most are link-local anyway; listing them keeps them refused even inside an allow-listed network.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(text)
    for text in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)


def unwrap(address: IPAddress) -> IPAddress:
    """IPv6 forms that carry an IPv4 address (mapped, 6to4, Teredo) are judged by that address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address.teredo is not None:
            return address.teredo[1]
    return address


def forbidden_category(address: IPAddress) -> str | None:
    """Why an address is not public ("loopback", "private", ...), or None for a public one."""
    address = unwrap(address)
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    for name, flag in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("private", address.is_private),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
    ):
        if flag:
            return name
    return None if address.is_global else "non-global"


# inet_aton's numeric host forms: 1-4 parts, each decimal, octal (leading 0) or hex (0x): `2130706433`,
# `0x7f000001`, `127.1`, `0177.0.0.1`. Resolvers (getaddrinfo) turn such a "name" into that IPv4 address.
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$", re.IGNORECASE)


def ip_literal(host: str) -> IPAddress | None:
    """The address a URL host denotes without any lookup: an IPv4/IPv6 literal, or one of inet_aton's numeric
    IPv4 forms (decimal, hex, octal, shortened) that resolvers map to an address. None for a name."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None  # e.g. a part out of range: no resolver maps it either
    return None


def parse_networks(cidrs: list[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def refusal(address: IPAddress, allow_networks: tuple[IPNetwork, ...]) -> str | None:
    """The category that makes `address` refused, or None when it is public or allow-listed.

    Cloud metadata passes only an entry naming exactly that address, never a broad range.
    """
    category = forbidden_category(address)
    if category is None:
        return None
    plain = unwrap(address)
    if category == "cloud metadata":
        allowed = any(net.num_addresses == 1 and plain in net for net in allow_networks)
    else:
        allowed = any(plain in net for net in allow_networks)
    return None if allowed else category
