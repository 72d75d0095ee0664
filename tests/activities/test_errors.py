"""The Temporal boundary of the error base: a LipsyncError becomes one ApplicationError."""

from __future__ import annotations

from activities.errors import AssetError, application_error_from, to_application_error
from realtime.engine.errors import AvatarNoFace
from realtime.ingest.errors import IngestError, IngestErrorCode
from realtime.sidecar.errors import NoFreeSlot
from workflows.contracts import ErrorCode


def test_a_retryable_error_may_be_retried() -> None:
    error = to_application_error(
        AssetError(ErrorCode.ASSET_UNREACHABLE, "connection refused", retryable=True)
    )
    assert error.type == "asset_unreachable"
    assert error.non_retryable is False
    assert error.message == "connection refused"


def test_a_non_retryable_error_is_never_retried() -> None:
    error = to_application_error(AssetError(ErrorCode.NOT_A_ZIP, "the avatar is not a readable zip archive"))
    assert error.type == "not_a_zip" and error.non_retryable is True
    # Any layer's error maps the same way: its code is the type.
    engine = to_application_error(AvatarNoFace("no face in frame 3"), context="prepare_avatar")
    assert (engine.type, engine.message, engine.non_retryable) == (
        "avatar_no_face",
        "prepare_avatar: no face in frame 3",
        True,
    )
    ingest = to_application_error(IngestError(IngestErrorCode.BAD_CONFIG, "sample_rate must be positive"))
    assert ingest.type == "bad_config" and ingest.non_retryable is True


def test_a_host_call_keeps_a_lipsync_code_and_gives_anything_else_the_default() -> None:
    slot = application_error_from(
        NoFreeSlot("all 4 slots are taken"), default_code=ErrorCode.SIDECAR_ERROR, context="x"
    )
    assert (slot.type, slot.message) == ("no_free_slot", "x: all 4 slots are taken")
    other = application_error_from(
        RuntimeError("boom"), default_code=ErrorCode.OUTPUT_OPEN_FAILED, context="open_output"
    )
    assert (other.type, other.message, other.non_retryable) == (
        "output_open_failed",
        "open_output: boom",
        True,
    )
    bare = application_error_from(RuntimeError(), default_code=ErrorCode.SIDECAR_ERROR, context="teardown")
    assert bare.message == "teardown: RuntimeError"
