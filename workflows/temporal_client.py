"""Temporal client connection with OpenTelemetry tracing, shared by the API, `lipsync worker` and sidecars.

The TracingInterceptor on the client carries the caller's trace context in Temporal headers,
so one trace runs from the HTTP request through the workflow to each activity, and it also
applies to every worker built on that client. Not workflow code.
"""

from __future__ import annotations

from temporalio.client import Client, Interceptor
from temporalio.contrib.opentelemetry import TracingInterceptor


async def connect_client(target: str, namespace: str = "default", *, tracing: bool = True) -> Client:
    interceptors: list[Interceptor] = [TracingInterceptor()] if tracing else []
    return await Client.connect(target, namespace=namespace, interceptors=interceptors)


def worker_tracing_interceptors(client: Client) -> list[TracingInterceptor]:
    """What a Worker must add for tracing: nothing when its client already traces (it applies to its
    workers)."""
    if any(isinstance(interceptor, TracingInterceptor) for interceptor in client.config()["interceptors"]):
        return []
    return [TracingInterceptor()]
