"""API keys: `X-API-Key: <key>` or `Authorization: Bearer <key>`; 401 without a valid one."""

from __future__ import annotations

import hmac

from fastapi import Request

from api.errors import ApiError

API_KEY_HEADER = "X-API-Key"


def _presented_key(request: Request) -> str | None:
    key = request.headers.get(API_KEY_HEADER)
    if key:
        return key
    authorization = request.headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


async def require_api_key(request: Request) -> None:
    keys: tuple[str, ...] = request.app.state.settings.api_keys
    presented = _presented_key(request)
    if presented is None:
        raise ApiError(401, "unauthorized", f"missing API key: send it in the {API_KEY_HEADER} header")
    # Compare against every key in constant time so timing does not reveal a prefix match.
    if not any(hmac.compare_digest(presented.encode(), key.encode()) for key in keys):
        raise ApiError(401, "unauthorized", "invalid API key")
