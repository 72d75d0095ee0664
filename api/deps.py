"""Per-app singletons the routes share (set up in `create_app`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from temporalio.client import Client

from api.audio_relay import RelayRegistry
from api.metrics import ApiMetrics
from api.readiness import ReadinessCache
from api.sessions import SessionService
from api.settings import ApiSettings
from api.sidecars import SidecarDirectory
from api.temporal import TemporalGateway


@dataclass
class Services:
    settings: ApiSettings
    temporal: TemporalGateway
    sessions: SessionService
    sidecars: SidecarDirectory
    relays: RelayRegistry
    metrics: ApiMetrics
    readiness: ReadinessCache = field(default_factory=ReadinessCache)


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


async def temporal_client(request: Request) -> Client:
    return await services(request).temporal.client()
