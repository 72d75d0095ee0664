"""The Temporal boundary of the error base: every `LipsyncError` becomes one `ApplicationError`.

Its `type` is the error's code (a `workflows.contracts.ErrorCode` value or a realtime code) and
it is non-retryable unless the error says a retry may succeed, so bad input is never retried and
the workflow reports the code as the reason. Pure functions (fetch, validation) raise `AssetError`.
"""

from __future__ import annotations

from temporalio.exceptions import ApplicationError

from realtime.errors import LipsyncError
from workflows.contracts import ErrorCode


class AssetError(LipsyncError):
    """An avatar asset refused by fetch or validation; `code` says why."""

    code: ErrorCode = ErrorCode.INVALID_REQUEST

    def __init__(self, code: ErrorCode, message: str, *, retryable: bool = False) -> None:
        super().__init__(message, code=code, retryable=retryable)


class NoCapacity(LipsyncError):
    """No sidecar of the session's pools has a free slot; a later attempt may find one."""

    code = ErrorCode.NO_CAPACITY.value
    retryable = True


def to_application_error(exc: LipsyncError, *, context: str = "") -> ApplicationError:
    """`exc` as Temporal sees it: `type` is its code; retryable only if `exc.retryable`."""
    message = f"{context}: {exc.message}" if context else exc.message
    return ApplicationError(message, type=str(exc.code), non_retryable=not exc.retryable)


def application_error_from(exc: BaseException, *, default_code: ErrorCode, context: str) -> ApplicationError:
    """Wrap what a SessionHost call raised; an error that is no `LipsyncError` gets `default_code`.

    Sidecar activities run once (maximum_attempts=1), so retryability is moot there; the
    workflow decides what a failure means (fallback, re-place, fail).
    """
    if not isinstance(exc, LipsyncError):
        exc = LipsyncError(str(exc) or type(exc).__name__, code=default_code.value)
    return to_application_error(exc, context=context)
