"""Tracing at the edge: spans for every HTTP request, `X-Trace-Id` on every response, one trace per session.

A session's trace starts with its `POST /v1/sessions` request; the Temporal TracingInterceptor
carries it into StartWorkflow, the workflow, every activity and the sidecar's activities.
The request's `traceparent` is kept in the workflow's memo, so later calls about the same
session (stop, interrupt, status) are recorded as spans of that same trace (with a link to
the request that made them) and answer with the session's trace id.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from fastapi import FastAPI
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.trace import Link, Span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TRACE_ID_HEADER = "X-Trace-Id"
MEMO_TRACEPARENT = "traceparent"

_tracer = trace.get_tracer("lipsync.api")
_propagator = TraceContextTextMapPropagator()


def format_trace_id(trace_id: int) -> str:
    return f"{trace_id:032x}"


def current_trace_id() -> str | None:
    context = trace.get_current_span().get_span_context()
    return format_trace_id(context.trace_id) if context.is_valid else None


def current_traceparent() -> dict[str, str]:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier


def trace_id_of(traceparent: str) -> str | None:
    # version-traceid-spanid-flags
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


@contextlib.contextmanager
def session_span(name: str, traceparent: str | None, **attributes: Any) -> Iterator[Span]:
    """A span in the session's trace (parent: its start request), linked to the current request's span."""
    request_context = trace.get_current_span().get_span_context()
    links = [Link(request_context)] if request_context.is_valid else []
    parent = _propagator.extract({MEMO_TRACEPARENT: traceparent}) if traceparent else None
    with _tracer.start_as_current_span(name, context=parent, links=links, attributes=attributes) as span:
        yield span


class TraceIdMiddleware:
    """Adds `X-Trace-Id` (the current trace) to responses that did not set it themselves.

    Runs inside the OpenTelemetry ASGI middleware, so the request's span is current here.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        trace_id = current_trace_id()

        async def send_with_trace_id(message: Message) -> None:
            if message["type"] == "http.response.start" and trace_id:
                headers = list(message.get("headers", []))
                name = TRACE_ID_HEADER.lower().encode()
                if not any(key.lower() == name for key, _ in headers):
                    headers.append((name, trace_id.encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_trace_id)


def instrument(app: FastAPI) -> None:
    app.add_middleware(TraceIdMiddleware)
    # /metrics and health probes are scraped every few seconds: spans for them are noise.
    FastAPIInstrumentor.instrument_app(
        app, excluded_urls="/metrics,/healthz,/readyz,/health", exclude_spans=["receive", "send"]
    )


def attach(carrier: Mapping[str, str]) -> object:
    """Make the context in `carrier` current (returns the token for `detach`)."""
    return otel_context.attach(_propagator.extract(dict(carrier)))


def detach(token: object) -> None:
    otel_context.detach(token)  # type: ignore[arg-type]
