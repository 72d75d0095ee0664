"""The API's Temporal connection: connected lazily, shared by every request, retried after a failure.

The API must answer /healthz, /readyz and /metrics while Temporal is down (that is when ops
look), so nothing connects at import or start-up; routes that need Temporal get a 503
`temporal_unavailable` instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging

from temporalio.client import Client

from api.errors import ApiError
from workflows.temporal_client import connect_client

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0


class TemporalGateway:
    def __init__(self, target: str, namespace: str, client: Client | None = None) -> None:
        self.target = target
        self.namespace = namespace
        self._client = client
        self._lock = asyncio.Lock()

    async def client(self) -> Client:
        """The shared client; raises ApiError(temporal_unavailable) when Temporal cannot be reached."""
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                try:
                    self._client = await asyncio.wait_for(
                        connect_client(self.target, self.namespace), timeout=CONNECT_TIMEOUT_S
                    )
                except (TimeoutError, OSError, RuntimeError) as exc:
                    logger.warning("temporal unreachable", extra={"target": self.target, "error": str(exc)})
                    raise ApiError(
                        "temporal_unavailable",
                        f"cannot reach Temporal at {self.target}: {exc or 'timeout'}",
                        retryable=True,
                    ) from exc
        return self._client
