"""The HTTP boundary of the error base: every error body is `{"code": ..., "message": ...}`.

A `LipsyncError` (the API's own `ApiError` included) answers with the status `HTTP_STATUS`
gives its code; framework errors (validation, routing, Temporal RPC) answer in the same shape.
Validation errors add `fields`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.service import RPCError, RPCStatusCode

from realtime.errors import LipsyncError
from workflows.client import is_transient_update_failure

logger = logging.getLogger(__name__)

# Error code -> HTTP status. A code not listed is a failure of the service itself: 500.
HTTP_STATUS: dict[str, int] = {
    "bad_request": 400,
    "bad_page_token": 400,
    "identity_reserved": 400,
    "room_too_long": 400,
    "ttl_too_long": 400,
    "url_forbidden_address": 400,
    "url_invalid": 400,
    "unauthorized": 401,
    "admin_only": 403,
    "forbidden": 403,
    "room_not_allowed": 403,
    "no_session_in_room": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "no_audio_connection": 409,
    "session_exists": 409,
    "body_too_large": 413,
    "validation_error": 422,
    "internal_error": 500,
    "temporal_error": 502,
    "temporal_unavailable": 503,
}


def http_status(code: str) -> int:
    return HTTP_STATUS.get(str(code), 500)


class ApiError(LipsyncError):
    """A request the API refuses; the status comes from `HTTP_STATUS` by its code.

    `headers` go on the error response (e.g. the trace id of the request it refuses).
    """

    def __init__(
        self, code: str, message: str, *, retryable: bool = False, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message, code=code, retryable=retryable)
        self.headers = headers


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
}


def _field_name(location: tuple[Any, ...] | list[Any]) -> str:
    # ("body", "output", "livekit", "room") -> "output.livekit.room"
    parts = [str(p) for p in location if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _field_error(error: Any) -> dict[str, str]:
    return {"field": _field_name(error.get("loc", ())), "message": error.get("msg", "")}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LipsyncError)
    async def lipsync_error(_: Request, exc: LipsyncError) -> JSONResponse:
        status = http_status(exc.code)
        if status >= 500 and not isinstance(exc, ApiError):
            # A lower layer's failure, not a refusal of the request: the log keeps its traceback.
            logger.error("request failed", exc_info=exc, extra={"code": str(exc.code)})
        headers = exc.headers if isinstance(exc, ApiError) else None
        content = {"code": str(exc.code), "message": exc.message}
        return JSONResponse(status_code=status, content=content, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [_field_error(err) for err in exc.errors()]
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        return JSONResponse(
            status_code=http_status("validation_error"),
            content={"code": "validation_error", "message": f"invalid request: {summary}", "fields": fields},
        )

    @app.exception_handler(RPCError)
    async def temporal_error(_: Request, exc: RPCError) -> JSONResponse:
        # Temporal failed mid-request (the connection itself is checked in api.temporal).
        if exc.status in (
            RPCStatusCode.UNAVAILABLE,
            RPCStatusCode.DEADLINE_EXCEEDED,
        ) or is_transient_update_failure(exc):
            # Retryable: the same request may succeed in a moment (the API already retried what it could).
            code = "temporal_unavailable"
        else:
            code = "temporal_error"
        logger.warning("temporal rpc failed", extra={"status": exc.status.name, "error": exc.message})
        content = {"code": code, "message": f"Temporal: {exc.message}"}
        return JSONResponse(status_code=http_status(code), content=content)

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return JSONResponse(
            status_code=500,
            content={
                "code": "internal_error",
                "message": f"{exc.__class__.__name__}; the API log has the details",
            },
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return JSONResponse(
            status_code=exc.status_code,
            content={"code": code, "message": str(exc.detail)},
            headers=getattr(exc, "headers", None),
        )
