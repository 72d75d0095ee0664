"""The audio WebSocket's close codes: one table for the sidecar's route and the API's relay."""

from __future__ import annotations

import pytest

from realtime.ingest.errors import IngestError, IngestErrorCode
from realtime.ingest.ws_close import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
    WS_CLOSE_CODES,
    ws_close_code,
)


@pytest.mark.parametrize(
    "code",
    [
        IngestErrorCode.UNKNOWN_ENCODING,
        IngestErrorCode.BAD_CONFIG,
        IngestErrorCode.UNKNOWN_SESSION,
        IngestErrorCode.REPLACED,
        IngestErrorCode.UNAUTHORIZED,
        IngestErrorCode.BUFFER_FULL,
    ],
)
def test_a_fatal_ingest_error_is_a_policy_violation(code: IngestErrorCode) -> None:
    error = IngestError(code, "refused", fatal=True)
    assert ws_close_code(error.code) == CLOSE_POLICY_VIOLATION
    assert ws_close_code(str(error.code)) == CLOSE_POLICY_VIOLATION  # the relay holds codes as text


def test_the_end_of_the_session_and_defects_have_their_own_codes() -> None:
    assert ws_close_code(IngestErrorCode.SESSION_ENDED) == CLOSE_GOING_AWAY
    assert ws_close_code(IngestErrorCode.INTERNAL_ERROR) == CLOSE_INTERNAL_ERROR
    assert ws_close_code(None) == CLOSE_NORMAL


def test_every_ingest_code_is_mapped_and_a_session_failure_is_the_services() -> None:
    assert sorted(code.value for code in IngestErrorCode if code.value not in WS_CLOSE_CODES) == []
    # The relay's own refusals of the caller, and a session that failed before it went live.
    assert ws_close_code("not_found") == CLOSE_POLICY_VIOLATION
    assert ws_close_code("missing_session_id") == CLOSE_POLICY_VIOLATION
    assert ws_close_code("asset_http_error") == CLOSE_INTERNAL_ERROR
    assert ws_close_code("sidecar_gone") == CLOSE_INTERNAL_ERROR
