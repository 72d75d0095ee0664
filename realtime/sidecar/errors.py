"""Sidecar control errors: stable codes the activities (and the dev HTTP API) report a failed step with."""

from __future__ import annotations

from realtime.errors import LipsyncError


class SidecarError(LipsyncError):
    code = "sidecar_error"


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
