"""Where each sidecar's HTTP/WS server is (LIPSYNC_SIDECAR_URLS), and the reads the API makes from it.

Placement (Temporal) knows each sidecar by id and task queue; the hot-path WebSocket and the
live stats are on the sidecar's own HTTP server, so the API keeps this id -> URL directory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import httpx

logger = logging.getLogger(__name__)

SIDECAR_READ_TIMEOUT_S = 2.0


class SidecarDirectory:
    def __init__(self, urls: Mapping[str, str], secret: str = "") -> None:
        self.urls = dict(urls)
        self._secret = secret
        self._http = httpx.AsyncClient(timeout=SIDECAR_READ_TIMEOUT_S, headers=self.service_headers())

    def service_headers(self) -> dict[str, str]:
        """The service credential every call to a sidecar carries (realtime.sidecar.auth)."""
        return {"Authorization": f"Bearer {self._secret}"} if self._secret else {}

    def http_url(self, sidecar_id: str) -> str | None:
        return self.urls.get(sidecar_id)

    def ws_url(self, sidecar_id: str) -> str | None:
        base = self.urls.get(sidecar_id)
        if base is None:
            return None
        return "ws" + base.removeprefix("http")  # http -> ws, https -> wss

    async def health(self, sidecar_id: str) -> dict[str, Any]:
        """The sidecar's /healthz document, or {"error": ...} when it does not answer."""
        base = self.urls.get(sidecar_id)
        if base is None:
            return {"error": f"sidecar {sidecar_id!r} is not in LIPSYNC_SIDECAR_URLS"}
        try:
            response = await self._http.get(f"{base}/healthz")
            response.raise_for_status()
            document: dict[str, Any] = response.json()
            return document
        except (httpx.HTTPError, ValueError) as exc:
            return {"error": f"{base}/healthz: {exc.__class__.__name__}: {exc}"}

    async def all_health(self) -> dict[str, dict[str, Any]]:
        ids = list(self.urls)
        documents = await asyncio.gather(*(self.health(sidecar_id) for sidecar_id in ids))
        return dict(zip(ids, documents, strict=True))

    async def session_stats(self, sidecar_id: str, session_id: str) -> dict[str, Any] | None:
        base = self.urls.get(sidecar_id)
        if base is None:
            return None
        try:
            response = await self._http.get(f"{base}/v1/sessions/{session_id}/stats")
        except httpx.HTTPError as exc:
            return {"error": f"{base}: {exc.__class__.__name__}: {exc}"}
        if response.status_code == 404:
            return None
        try:
            document: dict[str, Any] = response.json()
        except ValueError:
            return {"error": f"{base}: HTTP {response.status_code}"}
        return document

    async def close(self) -> None:
        await self._http.aclose()
