"""SSRF guard for RTMP outputs: a caller's rtmp(s):// URL must not make a sidecar connect inside its network.

The sidecar pushes the session to whatever RTMP URL the session request names; unchecked, that
is a way to open TCP connections from the GPU hosts to the metadata service, an internal port
or the host's own loopback. The host is resolved and every address checked like an asset URL's
(activities.net_guard, the policy's `outputs.rtmp_allow_networks` as exemptions). For rtmp://
the URL is then pinned to the checked address, so the encoder does not resolve the name again
(no DNS rebinding between check and connect). rtmps:// keeps the name: TLS needs it for SNI, so
there the check and the connect each resolve it.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit, urlunsplit

from activities.errors import AssetError
from activities.net_guard import AddressPolicy, resolve_checked
from realtime.outputs.errors import RtmpUrlError
from realtime.outputs.rtmp_stream import validate_rtmp_url
from workflows.contracts import ErrorCode

RTMP_DEFAULT_PORT = 1935
RTMPS_DEFAULT_PORT = 443


async def checked_rtmp_url(url: str, allow_networks: list[str]) -> str:
    """The URL to publish to (rtmp:// pinned to the checked address); AssetError when it is refused."""
    try:
        validate_rtmp_url(url)
    except RtmpUrlError as exc:
        raise AssetError(ErrorCode.URL_INVALID, exc.message) from None
    parts = urlsplit(url)
    secure = parts.scheme.lower() == "rtmps"
    host = parts.hostname or ""
    port = parts.port or (RTMPS_DEFAULT_PORT if secure else RTMP_DEFAULT_PORT)
    address = await resolve_checked(
        host,
        port,
        AddressPolicy.from_cidrs(allow_networks),
        code=ErrorCode.URL_FORBIDDEN_ADDRESS,
        what="the RTMP output URL",
    )
    if secure:
        return url
    literal = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (f"{userinfo}@" if userinfo else "") + literal + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
