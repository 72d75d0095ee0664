"""Typed activity errors: a machine-readable code (workflows.contracts.ErrorCode) plus a sentence.

Pure functions (fetch, validation) raise `AssetError`; the activity boundary turns it into a
Temporal `ApplicationError` whose `type` is the code, non-retryable unless the cause is
transient, so bad input is never retried and the workflow reports the code as the reason.
"""

from __future__ import annotations

from temporalio.exceptions import ApplicationError

from workflows.contracts import ErrorCode


class AssetError(Exception):
    def __init__(self, code: ErrorCode, message: str, *, retryable: bool = False) -> None:
        super().__init__(f"[{code.value}] {message}")
        self.code = code
        self.message = message
        self.retryable = retryable

    def to_application_error(self) -> ApplicationError:
        return ApplicationError(self.message, type=self.code.value, non_retryable=not self.retryable)


def application_error_from(exc: BaseException, *, default_code: ErrorCode, context: str) -> ApplicationError:
    """Wrap an exception raised by a SessionHost: its `code` (realtime errors carry one) becomes the type.

    Sidecar activities run once (maximum_attempts=1), so retryability is moot there; the
    workflow decides what a failure means (fallback, re-place, fail).
    """
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return ApplicationError(
        f"{context}: {message}",
        type=code if isinstance(code, str) and code else default_code.value,
        non_retryable=True,
    )
