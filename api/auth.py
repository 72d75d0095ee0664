"""API keys and tenants: `X-API-Key: <key>` or `Authorization: Bearer <key>`; 401 without a valid one.

Every key belongs to a tenant (api/settings.py reads `tenant:key` entries); a key without a tenant
name belongs to the `default` tenant, and admin keys (LIPSYNC_ADMIN_KEYS) see every tenant's sessions
and the operations routes' details. Sessions belong to the tenant that started them
(api/sessions.py); another tenant gets 404 for them, as if they did not exist.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import Headers

from api.errors import ApiError
from api.settings import ADMIN_TENANT, DEFAULT_TENANT, ApiSettings

API_KEY_HEADER = "X-API-Key"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant, or an admin (who may see and act on every tenant's sessions)."""

    tenant: str
    admin: bool = False

    def owns(self, tenant: str) -> bool:
        return self.admin or hmac.compare_digest(self.tenant.encode(), (tenant or DEFAULT_TENANT).encode())


def presented_key(headers: Headers, query_key: str | None = None) -> str | None:
    key = headers.get(API_KEY_HEADER) or query_key
    if key:
        return key
    authorization = headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def principal_for(settings: ApiSettings, presented: str) -> Principal | None:
    """The principal of `presented`, or None. Every known key is compared in constant time, so timing reveals
    neither a prefix match nor which list (admin, tenant, default) holds a key."""
    found: Principal | None = None
    admin = Principal(ADMIN_TENANT, admin=True)
    candidates: list[tuple[str, Principal]] = [(key, admin) for key in settings.admin_keys]
    candidates += [(key, Principal(tenant)) for key, tenant in settings.tenant_keys.items()]
    candidates += [(key, Principal(DEFAULT_TENANT)) for key in settings.api_keys]
    for key, principal in candidates:
        if hmac.compare_digest(presented.encode(), key.encode()) and found is None:
            found = principal
    return found


async def require_api_key(request: Request) -> Principal:
    """The dependency of every keyed route: the caller's principal.

    It is also kept in `request.state.principal`.
    """
    settings: ApiSettings = request.app.state.settings
    presented = presented_key(request.headers)
    if presented is None:
        raise ApiError("unauthorized", f"missing API key: send it in the {API_KEY_HEADER} header")
    principal = principal_for(settings, presented)
    if principal is None:
        raise ApiError("unauthorized", "invalid API key")
    request.state.principal = principal
    return principal


async def require_admin(request: Request) -> Principal:
    principal = await require_api_key(request)
    if not principal.admin:
        raise ApiError("admin_only", "this route shows every tenant's sessions: it needs an admin key")
    return principal
