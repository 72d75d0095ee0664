"""Ingest errors: a stable machine-readable `code` and a sentence a client developer can act on.

They travel to the client as `{"type": "error", "code": ..., "message": ...}`. An error
that rejects audio says how many samples it rejected, so the session's accounting
(received == rendered + pending + rejected + flushed) still adds up.
"""

from __future__ import annotations

from enum import StrEnum

from realtime.errors import LipsyncError


class IngestErrorCode(StrEnum):
    MISALIGNED_PCM = "misaligned_pcm"  # byte count is not a whole number of sample frames
    NON_FINITE_SAMPLES = "non_finite_samples"  # f32le message holds NaN or ±inf
    SAMPLES_OUT_OF_RANGE = "samples_out_of_range"  # f32le values far outside [-1, 1] (int16-scaled floats)
    UNKNOWN_ENCODING = "unknown_encoding"
    BAD_CONFIG = "bad_config"  # sample rate, channels or keys of a config are invalid
    MESSAGE_TOO_LARGE = "message_too_large"
    BUFFER_FULL = "buffer_full"  # more audio buffered than the session's limit
    BAD_JSON = "bad_json"
    UNKNOWN_MESSAGE_TYPE = "unknown_message_type"
    UNKNOWN_SESSION = "unknown_session"
    SESSION_ENDED = "session_ended"
    REPLACED = "replaced"  # a newer audio connection for the same session took over
    INTERNAL_ERROR = "internal_error"  # a bug on our side: the connection closes, the session goes on
    UNAUTHORIZED = "unauthorized"  # no service credential and no valid audio token for this session


class IngestError(LipsyncError):
    """One rejected message or connection.

    `rejected_samples` counts the audio it refused in 16 kHz timeline samples (0 for
    control messages). `fatal` errors close the connection (its format is unknown or
    the session is gone); the rest leave it open and the client may go on.
    """

    code: IngestErrorCode = IngestErrorCode.INTERNAL_ERROR

    def __init__(
        self,
        code: IngestErrorCode,
        message: str,
        *,
        rejected_samples: int = 0,
        fatal: bool = False,
    ) -> None:
        super().__init__(message, code=code)
        self.rejected_samples = rejected_samples
        self.fatal = fatal

    def to_message(self) -> dict[str, object]:
        return {"type": "error", "code": str(self.code), "message": self.message}
