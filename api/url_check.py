"""A syntactic pre-check of caller-supplied URLs, so an obviously bad one fails at the door (400 with a code).

The full SSRF guard is the fetch activity's (activities/net_guard.py): it resolves names and
checks every address of every redirect hop. Here we refuse what needs no resolution: other
schemes, credentials in the URL (they would be stored in workflow history), and literal IP
addresses that are loopback, private, link-local, cloud metadata or otherwise not public —
unless the policy's `assets.fetch.allow_networks` names them (tests, the demo's loopback server).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from api.errors import ApiError

# The metadata services of the large clouds (also refused by the fetch activity).
_METADATA = frozenset(
    ipaddress.ip_address(text)
    for text in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _unwrap(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """IPv6 forms that carry an IPv4 address (mapped, 6to4, Teredo) are judged by it, as the fetch guard does."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address.teredo is not None:
            return address.teredo[1]
    return address


def _category(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    address = _unwrap(address)
    if address in _METADATA:
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


def check_asset_url(url: str, field: str, allow_networks: list[str]) -> None:
    """Raise ApiError(400, code) for a URL the fetch activity would certainly refuse."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ApiError(400, "url_invalid", f"{field}: only http and https URLs are fetched, not {parts.scheme!r}")
    if not parts.hostname:
        raise ApiError(400, "url_invalid", f"{field}: the URL has no host")
    if parts.username or parts.password:
        raise ApiError(400, "url_invalid", f"{field}: credentials in the URL are refused (they would be logged)")
    host = parts.hostname.lower().rstrip(".")
    if host in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
        address = ipaddress.ip_address("127.0.0.1")
    else:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return  # a name: the fetch activity resolves and checks it
    category = _category(address)
    if category is None:
        return
    networks: list[IPNetwork] = [ipaddress.ip_network(cidr, strict=False) for cidr in allow_networks]
    plain = _unwrap(address)
    if category == "cloud metadata":
        allowed = any(net.num_addresses == 1 and plain in net for net in networks)
    else:
        allowed = any(plain in net for net in networks)
    if not allowed:
        raise ApiError(
            400,
            "url_forbidden_address",
            f"{field}: {parts.hostname} is a {category} address, which is not allow-listed "
            "(assets.fetch.allow_networks in the policy file)",
        )
