"""OpenTelemetry set-up shared by every process (api, worker, sidecar): one tracer provider, one exporter.

The exporter is configurable: `console` (spans as JSON lines on stderr), `otlp` (OTLP/HTTP to
OTEL_EXPORTER_OTLP_ENDPOINT) or `none`. Context crosses process boundaries as W3C
`traceparent` (HTTP headers, Temporal headers via its TracingInterceptor, the sidecar's WS).
"""

from __future__ import annotations

import logging
import os
from enum import StrEnum

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)

from realtime.errors import LipsyncError

logger = logging.getLogger(__name__)

EXPORTER_ENV = "LIPSYNC_TRACE_EXPORTER"


class TraceExporter(StrEnum):
    NONE = "none"
    CONSOLE = "console"
    OTLP = "otlp"


class TelemetryConfigError(LipsyncError, ValueError):
    """A tracing setting (environment variable) is invalid."""

    code = "telemetry_config_invalid"


def parse_exporter(value: str | None) -> TraceExporter:
    try:
        return TraceExporter((value or TraceExporter.NONE).lower())
    except ValueError:
        choices = ", ".join(e.value for e in TraceExporter)
        raise TelemetryConfigError(f"{EXPORTER_ENV}={value!r} is not one of: {choices}") from None


def configure_tracing(service_name: str, exporter: TraceExporter | None = None) -> TracerProvider:
    """Install the process-wide tracer provider (idempotent: a second call returns the first provider)."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    chosen = exporter if exporter is not None else parse_exporter(os.environ.get(EXPORTER_ENV))
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    span_exporter: SpanExporter | None = None
    if chosen is TraceExporter.CONSOLE:
        span_exporter = ConsoleSpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    elif chosen is TraceExporter.OTLP:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415 (heavy: the OTLP exporter)

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    logger.info("tracing configured", extra={"service": service_name, "exporter": chosen.value})
    return provider
