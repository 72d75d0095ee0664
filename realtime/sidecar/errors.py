"""Sidecar control errors: stable codes for the activities (and the dev HTTP API) to map to a failed phase."""

from __future__ import annotations


class SidecarError(Exception):
    code = "sidecar_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class NoFreeSlot(SidecarError):
    code = "no_free_slot"


class UnknownSession(SidecarError):
    code = "unknown_session"


class SessionNotPrepared(SidecarError):
    code = "session_not_prepared"


class OutputAlreadyOpen(SidecarError):
    code = "output_already_open"


class OutputUnsupported(SidecarError):
    code = "output_unsupported"
