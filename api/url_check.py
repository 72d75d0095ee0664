"""A syntactic pre-check of caller-supplied URLs, so an obviously bad one fails at the door (400 with a code).

The full SSRF guard is the fetch activity's (activities/net_guard.py): it resolves names and
checks every address of every redirect hop. Here we refuse what needs no resolution: malformed
URLs, other schemes, credentials in the URL (they would be stored in workflow history), and
literal IP addresses (numeric forms such as `2130706433`, `0x7f000001` or `127.1` included)
that are loopback, private, link-local, cloud metadata or otherwise not public — unless the
policy's `assets.fetch.allow_networks` names them (tests, the demo's loopback server).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from api.errors import ApiError
from workflows.net_addresses import IPAddress, ip_literal, parse_networks, refusal


def check_asset_url(url: str, field: str, allow_networks: list[str]) -> None:
    """Raise ApiError(code) for a URL the fetch activity would certainly refuse."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
        _ = parts.port  # a port out of range or not a number raises here
    except ValueError as exc:  # e.g. "http://[::1/a.zip": Invalid IPv6 URL
        raise ApiError("url_invalid", f"{field}: not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ApiError("url_invalid", f"{field}: only http and https URLs are fetched, not {parts.scheme!r}")
    if not hostname:
        raise ApiError("url_invalid", f"{field}: the URL has no host")
    if parts.username or parts.password:
        raise ApiError("url_invalid", f"{field}: credentials in the URL are refused (they would be logged)")
    host = hostname.lower().rstrip(".")
    address: IPAddress | None = ipaddress.ip_address("127.0.0.1")
    if host not in ("localhost", "localhost.localdomain") and not host.endswith(".localhost"):
        address = ip_literal(host)  # numeric forms such as 2130706433 or 0x7f000001 too
    if address is None:
        return  # a name: the fetch activity resolves and checks it
    category = refusal(address, parse_networks(allow_networks))
    if category is not None:
        raise ApiError(
            "url_forbidden_address",
            f"{field}: {hostname} is a {category} address, which is not allow-listed "
            "(assets.fetch.allow_networks in the policy file)",
        )
