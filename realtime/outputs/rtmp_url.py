"""RTMP(S) publish URLs: the syntactic check and the redaction every log and status line uses.

Kept apart from the stream writer so the API and the output registry can use them without
loading the codecs.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from realtime.outputs.errors import RtmpUrlError

RTMP_SCHEMES = ("rtmp", "rtmps")


def validate_rtmp_url(url: str) -> str:
    """Return the URL if it is a usable rtmp:// or rtmps:// publish URL, else raise RtmpUrlError."""
    if not isinstance(url, str) or not url or any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise RtmpUrlError("the RTMP URL is empty or contains whitespace/control characters")
    parts = urlsplit(url)
    if parts.scheme.lower() not in RTMP_SCHEMES:
        raise RtmpUrlError(
            f"the RTMP URL must start with rtmp:// or rtmps://, not {parts.scheme or 'nothing'}://"
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise RtmpUrlError(f"the RTMP URL has an invalid port: {exc}") from None
    if not parts.hostname:
        raise RtmpUrlError("the RTMP URL has no host")
    segments = [s for s in parts.path.split("/") if s]
    if len(segments) < 2:
        raise RtmpUrlError(
            "the RTMP URL needs an application and a stream key: rtmp://host[:port]/app/stream"
        )
    del port
    return url


def redact_rtmp_url(url: str) -> str:
    """The URL without its stream key (keys are credentials: keep them out of logs and status)."""
    parts = urlsplit(url)
    app = [s for s in parts.path.split("/") if s][:1]
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/{'/'.join(app)}/***"
