"""One in-memory span exporter for the test process (the global tracer provider can be set only once)."""

from __future__ import annotations

from functools import cache

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


@cache
def span_exporter() -> InMemorySpanExporter:
    """Spans of every tracer in this process, from now on (added to the SDK provider, installed if need
    be)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def span_names(trace_id_hex: str) -> list[str]:
    trace_id = int(trace_id_hex, 16)
    return [span.name for span in span_exporter().get_finished_spans() if span.context.trace_id == trace_id]
