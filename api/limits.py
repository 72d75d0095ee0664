"""Request limits before work: the API key first, then a per-route body size cap, before any body is read.

FastAPI reads and parses a request's JSON body before it runs the route's dependencies, so a key
check in a dependency comes after an unauthenticated caller's body was buffered and parsed. This
ASGI middleware runs before all of that, for every request that may carry a body (every such
route of this API needs a key):

1. no valid API key: 401 `unauthorized`, the body never read;
2. a declared Content-Length over the route's cap: 413 `body_too_large`, the body never read;
3. otherwise the body is read up to the cap (a chunked body that goes past it: 413) and handed on.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import API_KEY_HEADER, presented_key, principal_for
from api.errors import http_status
from api.settings import ApiSettings

BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# The largest valid POST /v1/sessions body (two 2 KiB URLs, 32 metadata entries of 512 characters, the rest)
# is well under 64 KiB; every other body is a few hundred bytes.
DEFAULT_MAX_BODY_BYTES = 16 * 1024
ROUTE_MAX_BODY_BYTES = {"/v1/sessions": 64 * 1024}


def max_body_bytes(path: str) -> int:
    return ROUTE_MAX_BODY_BYTES.get(path.rstrip("/"), DEFAULT_MAX_BODY_BYTES)


class RequestGate:
    def __init__(self, app: ASGIApp, settings: ApiSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        presented = presented_key(headers)
        if presented is None or principal_for(self.settings, presented) is None:
            why = (
                f"missing API key: send it in the {API_KEY_HEADER} header"
                if presented is None
                else "invalid API key"
            )
            await _refuse(scope, send, "unauthorized", why)
            return
        cap = max_body_bytes(scope["path"])
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            await _refuse(scope, send, "body_too_large", f"the body exceeds {cap} bytes for this route")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            received = await receive()
            if received["type"] == "http.disconnect":
                return
            chunk = received.get("body", b"")
            size += len(chunk)
            if size > cap:
                await _refuse(scope, send, "body_too_large", f"the body exceeds {cap} bytes for this route")
                return
            chunks.append(chunk)
            if not received.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


async def _refuse(scope: Scope, send: Send, code: str, message: str) -> None:
    """Answer without reading the body (the server discards what the client still sends)."""

    async def no_body() -> Message:
        return {"type": "http.disconnect"}

    status = http_status(code)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {"Connection": "close"}
    await JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)(
        scope,
        no_body,
        send,
    )
