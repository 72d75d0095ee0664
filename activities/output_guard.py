"""SSRF guard for output URLs: a caller's URL (e.g. rtmp(s)://) must not make a sidecar connect inside its
network.

The sidecar pushes the session to whatever URL the session request names; unchecked, that is a
way to open TCP connections from the GPU hosts to the metadata service, an internal port or the
host's own loopback. Each output kind declares its URL guard in `realtime.outputs.registry`
(schemes, default ports, which schemes are pinned). The host is resolved and every address
checked like an asset URL's (activities.net_guard, the policy's `outputs.rtmp_allow_networks` as
exemptions). A pinned scheme (rtmp://) is then rewritten to the checked address, so the encoder
does not resolve the name again (no DNS rebinding between check and connect). A TLS scheme
(rtmps://) keeps the name: TLS needs it for SNI, so there the check and the connect each resolve it.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit, urlunsplit

from activities.errors import AssetError
from activities.net_guard import AddressPolicy, resolve_checked
from realtime.outputs.errors import OutputError
from realtime.outputs.registry import UrlGuard
from workflows.contracts import ErrorCode


async def checked_output_url(url: str, guard: UrlGuard, allow_networks: list[str]) -> str:
    """The URL to connect to (pinned to the checked address where the guard says so); AssetError when
    refused."""
    try:
        guard.validate(url)
    except OutputError as exc:
        raise AssetError(ErrorCode.URL_INVALID, exc.message) from None
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in guard.default_ports:
        raise AssetError(ErrorCode.URL_INVALID, f"{guard.what} must use one of {sorted(guard.default_ports)}")
    address = await resolve_checked(
        parts.hostname or "",
        parts.port or guard.default_ports[scheme],
        AddressPolicy.from_cidrs(allow_networks),
        code=ErrorCode.URL_FORBIDDEN_ADDRESS,
        what=guard.what,
    )
    if scheme not in guard.pinned_schemes:
        return url
    literal = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (f"{userinfo}@" if userinfo else "") + literal + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
