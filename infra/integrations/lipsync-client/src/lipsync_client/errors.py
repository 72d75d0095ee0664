"""The client's errors: each carries the server's machine-readable code when there is one."""

from __future__ import annotations

from typing import Any


class LipsyncError(Exception):
    """Base class of everything this client raises on purpose."""

    code: str = "client_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ApiError(LipsyncError):
    """The API answered with an error status: `status_code`, the body's `code` and `message`."""

    def __init__(self, status_code: int, code: str, message: str, body: Any = None) -> None:
        super().__init__(f"HTTP {status_code} {code}: {message}", code=code)
        self.message = message  # the server's sentence; str(self) adds the status and code
        self.status_code = status_code
        self.body = body


class ApiUnreachableError(LipsyncError):
    """The API could not be reached (connection refused, DNS, timeout)."""

    code = "api_unreachable"


class SessionFailedError(LipsyncError):
    """The session ended (failed, or completed) while the caller was waiting for it to go live."""

    def __init__(self, session_id: str, phase: str, code: str, message: str) -> None:
        super().__init__(f"session {session_id} is {phase}: {code}: {message}", code=code or "session_failed")
        self.session_id = session_id
        self.phase = phase


class AudioStreamError(LipsyncError):
    """The audio WebSocket answered `error` with a fatal code, or closed while the caller waited."""


class WaitTimeoutError(LipsyncError):
    """A wait (for a phase, a WebSocket event, the avatar participant) ran past its timeout."""

    code = "timeout"
