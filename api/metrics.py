"""Prometheus metrics at `/metrics`: the API's own counters plus a scrape-time view of sessions and sidecars.

Sessions by phase come from Temporal visibility (running SessionWorkflows' `LipsyncPhase`,
closed ones by execution status); per-session media numbers (TTFF, fps, frame lateness, AV
offset, audio sample accounting, fallbacks) come from every sidecar's `/healthz`, read at
scrape time. Per-session series carry `session_id` and `sidecar` labels and disappear when
the session ends; the TTFF histogram keeps every session's first-frame time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from temporalio.client import Client, WorkflowExecutionStatus

from api.sidecars import SidecarDirectory
from workflows import search_attributes

logger = logging.getLogger(__name__)

RUNNING_SESSIONS_SCANNED_MAX = 2000
# Per-session sample counters, from realtime.host.SessionStats.
_SAMPLE_KINDS = ("received", "rendered", "rejected", "published", "pending", "flushed")


class ApiMetrics:
    """Counters the API process owns (they survive between scrapes)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Histogram(
            "lipsync_api_request_duration_seconds",
            "API request latency by route",
            ["method", "route", "status"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.sessions_started = Counter(
            "lipsync_sessions_started", "POST /v1/sessions outcomes", ["result"], registry=self.registry
        )
        self.ttff = Histogram(
            "lipsync_session_ttff_seconds",
            "time to first speech frame published (first PCM in -> first lip frame out), one sample per "
            "session",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0),
            registry=self.registry,
        )
        self._ttff_seen: set[str] = set()
        self._last_frames: dict[str, tuple[float, int]] = {}  # session -> (monotonic s, frames_published)
        self._fps: dict[str, float] = {}

    def observe_sessions(self, sessions: dict[str, dict[str, Any]]) -> None:
        """Fold one scrape's per-session stats into the TTFF histogram and the fps estimate."""
        now = time.monotonic()
        for session_id, stats in sessions.items():
            ttff_ms = stats.get("ttff_ms")
            if ttff_ms is not None and session_id not in self._ttff_seen:
                self._ttff_seen.add(session_id)
                self.ttff.observe(float(ttff_ms) / 1000.0)
            frames = stats.get("frames_published")
            if isinstance(frames, int):
                previous = self._last_frames.get(session_id)
                if previous is not None and now - previous[0] > 0.2:
                    self._fps[session_id] = (frames - previous[1]) / (now - previous[0])
                self._last_frames[session_id] = (now, frames)
        for session_id in set(self._last_frames) - set(sessions):
            self._last_frames.pop(session_id, None)
            self._fps.pop(session_id, None)

    def fps(self, session_id: str) -> float | None:
        return self._fps.get(session_id)


class _Snapshot(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


async def sessions_by_phase(client: Client) -> tuple[dict[str, int], dict[str, int]]:
    """(running sessions by LipsyncPhase, closed sessions by execution status)."""
    running: dict[str, int] = {}
    scanned = 0
    async for execution in client.list_workflows(
        "WorkflowType = 'SessionWorkflow' AND ExecutionStatus = 'Running'", page_size=500
    ):
        phase = execution.typed_search_attributes.get(search_attributes.PHASE) or "pending"
        running[phase] = running.get(phase, 0) + 1
        scanned += 1
        if scanned >= RUNNING_SESSIONS_SCANNED_MAX:
            break
    closed: dict[str, int] = {}
    for status in (
        WorkflowExecutionStatus.COMPLETED,
        WorkflowExecutionStatus.FAILED,
        WorkflowExecutionStatus.CANCELED,
        WorkflowExecutionStatus.TERMINATED,
        WorkflowExecutionStatus.TIMED_OUT,
    ):
        name = {"CANCELED": "Canceled", "TIMED_OUT": "TimedOut"}.get(status.name, status.name.title())
        count = await client.count_workflows(
            f"WorkflowType = 'SessionWorkflow' AND ExecutionStatus = '{name}'",
        )
        closed[status.name.lower()] = count.count
    return running, closed


async def render(metrics: ApiMetrics, client: Client | None, sidecars: SidecarDirectory) -> bytes:
    families: list[Metric] = []
    temporal_up = GaugeMetricFamily("lipsync_temporal_up", "1 when Temporal visibility answered this scrape")
    if client is not None:
        try:
            running, closed = await sessions_by_phase(client)
            temporal_up.add_metric([], 1.0)
            by_phase = GaugeMetricFamily(
                "lipsync_sessions", "running sessions by phase (LipsyncPhase)", labels=["phase"]
            )
            for phase, count in sorted(running.items()):
                by_phase.add_metric([phase], float(count))
            ended = CounterMetricFamily(
                "lipsync_sessions_ended", "sessions ended, by Temporal execution status", labels=["status"]
            )
            for status, count in sorted(closed.items()):
                ended.add_metric([status], float(count))
            families += [by_phase, ended]
        except Exception as exc:  # Temporal down: the scrape still answers (with temporal_up 0)
            logger.warning("metrics: visibility unavailable", extra={"error": str(exc)})
            temporal_up.add_metric([], 0.0)
    else:
        temporal_up.add_metric([], 0.0)
    families.append(temporal_up)
    families += await _sidecar_families(metrics, sidecars)
    return generate_latest(metrics.registry) + generate_latest(_registry_of(families))


def _registry_of(families: Iterable[Metric]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(list(families)))
    return registry


async def _sidecar_families(metrics: ApiMetrics, sidecars: SidecarDirectory) -> list[Metric]:
    health = await sidecars.all_health()
    up = GaugeMetricFamily("lipsync_sidecar_up", "1 when the sidecar's /healthz answered", labels=["sidecar"])
    slots_free = GaugeMetricFamily("lipsync_sidecar_slots_free", "free session slots", labels=["sidecar"])
    cache_bytes = GaugeMetricFamily(
        "lipsync_sidecar_avatar_cache_bytes", "the sidecar's avatar cache on disk (bytes)", labels=["sidecar"]
    )
    cache_max_bytes = GaugeMetricFamily(
        "lipsync_sidecar_avatar_cache_max_bytes",
        "the avatar cache's cap (LRU eviction past it)",
        labels=["sidecar"],
    )
    labels = ["session_id", "sidecar"]
    gauges = {
        "ttff_ms": GaugeMetricFamily(
            "lipsync_session_ttff_ms",
            "time to first speech frame (ms)",
            labels=labels,
        ),
        "fps": GaugeMetricFamily(
            "lipsync_session_fps",
            "frames published per second since last scrape",
            labels=labels,
        ),
        "lateness_ms_p99": GaugeMetricFamily(
            "lipsync_session_frame_lateness_ms_p99",
            "frame lateness vs the 25 fps clock, p99 (ms)",
            labels=labels,
        ),
        "lateness_ms_p50": GaugeMetricFamily(
            "lipsync_session_frame_lateness_ms_p50",
            "frame lateness vs the 25 fps clock, p50 (ms)",
            labels=labels,
        ),
        "av_offset_ms": GaugeMetricFamily(
            "lipsync_session_av_offset_ms", "audio/video offset, positive = video late (ms)", labels=labels
        ),
    }
    frames = CounterMetricFamily("lipsync_session_frames", "video frames by kind", labels=[*labels, "kind"])
    samples = CounterMetricFamily(
        "lipsync_session_audio_samples",
        "16 kHz audio samples: received = rendered + pending + rejected + flushed",
        labels=[*labels, "kind"],
    )
    fallbacks = CounterMetricFamily(
        "lipsync_session_fallbacks", "output switches (e.g. LiveKit -> RTMP)", labels=labels
    )
    all_sessions: dict[str, dict[str, Any]] = {}
    session_sidecar: dict[str, str] = {}
    for sidecar_id, document in sorted(health.items()):
        ok = "error" not in document
        up.add_metric([sidecar_id], 1.0 if ok else 0.0)
        if not ok:
            continue
        capacity = document.get("capacity") or {}
        if "slots_free" in capacity:
            slots_free.add_metric([sidecar_id], float(capacity["slots_free"]))
        caches = document.get("caches") or {}
        if "avatar_cache_bytes" in caches:
            cache_bytes.add_metric([sidecar_id], float(caches["avatar_cache_bytes"]))
            cache_max_bytes.add_metric([sidecar_id], float(caches["avatar_cache_max_bytes"]))
        for session_id, stats in (document.get("sessions") or {}).items():
            if "frames_published" not in stats:
                continue  # still preparing
            all_sessions[session_id] = stats
            session_sidecar[session_id] = sidecar_id
            values = [session_id, sidecar_id]
            extra = stats.get("extra") or {}
            for key, family in gauges.items():
                value = stats.get(key, extra.get(key))
                if key == "fps":
                    value = None  # filled below, after observe_sessions
                if value is not None:
                    family.add_metric(values, float(value))
            for kind in ("speech", "idle", "dropped"):
                frames.add_metric([*values, kind], float(stats.get(f"{kind}_frames", 0)))
            for kind in _SAMPLE_KINDS:
                samples.add_metric([*values, kind], float(stats.get(f"audio_samples_{kind}", 0)))
            fallbacks.add_metric(values, float(stats.get("fallbacks", 0)))
    metrics.observe_sessions(all_sessions)
    for session_id, sidecar_id in session_sidecar.items():
        fps = metrics.fps(session_id)
        if fps is not None:
            gauges["fps"].add_metric([session_id, sidecar_id], fps)
    return [up, slots_free, cache_bytes, cache_max_bytes, *gauges.values(), frames, samples, fallbacks]
