"""Output errors with stable codes (reported as a failed step or an `error` message)."""

from __future__ import annotations

from realtime.errors import LipsyncError


class OutputError(LipsyncError):
    code = "output_error"


class RtmpUrlError(OutputError):
    code = "rtmp_url_invalid"


class RtmpPublishRefused(OutputError):
    code = "rtmp_publish_refused"


class RecordingError(OutputError):
    code = "recording_failed"
