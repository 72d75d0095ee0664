"""The one error base of the service.

Every failure the code raises on purpose carries a stable machine-readable `code`, a
sentence a person can act on (`message`) and whether trying the same thing again may help
(`retryable`). Each boundary maps it once: HTTP status in `api/errors.py`, WebSocket close
codes in `realtime/ingest/ws_close.py` (the sidecar's audio route and the API's relay),
Temporal `ApplicationError` in `activities/errors.py`.
It lives in `realtime` because that is the lowest package: every other layer may import it.
"""

from __future__ import annotations


class LipsyncError(Exception):
    """Base class: subclasses set `code` (and `retryable` where a retry can succeed)."""

    code: str = "internal_error"
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    def to_dict(self) -> dict[str, object]:
        return {"code": str(self.code), "message": self.message, "retryable": self.retryable}
