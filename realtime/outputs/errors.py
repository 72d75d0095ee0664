"""Output errors with machine-readable codes (surfaced as a failed phase or an `error` message)."""

from __future__ import annotations


class OutputError(Exception):
    code = "output_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RtmpUrlError(OutputError):
    code = "rtmp_url_invalid"


class RtmpPublishRefused(OutputError):
    code = "rtmp_publish_refused"


class RecordingError(OutputError):
    code = "recording_failed"
