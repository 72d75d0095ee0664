"""The audio WebSocket's close codes: one table for the sidecar's audio route and the API's relay of it.

A client reads what to do from the close code alone (RFC 6455 7.4.1): 1008 means its request or
its audio was refused, so the same again fails again; 1001 means the session ended; 1011 means
the service failed, not the client. The `error` message sent before the close names the code.
"""

from __future__ import annotations

from realtime.ingest.errors import IngestErrorCode

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011

# Error code -> close code. A code not listed is a failure of the session or of the service: 1011.
WS_CLOSE_CODES: dict[str, int] = {
    **{code.value: CLOSE_POLICY_VIOLATION for code in IngestErrorCode},
    IngestErrorCode.SESSION_ENDED.value: CLOSE_GOING_AWAY,
    IngestErrorCode.INTERNAL_ERROR.value: CLOSE_INTERNAL_ERROR,
    # the API relay's own refusals of the caller
    "not_found": CLOSE_POLICY_VIOLATION,
    "missing_session_id": CLOSE_POLICY_VIOLATION,
}


def ws_close_code(error_code: str | None) -> int:
    """The close code for a connection closed because of `error_code` (None: a normal end)."""
    if error_code is None:
        return CLOSE_NORMAL
    return WS_CLOSE_CODES.get(str(error_code), CLOSE_INTERNAL_ERROR)
