"""`LoopbackSessionHost`: a small but genuine `realtime.host.SessionHost` for orchestration tests.

THIS IS NOT THE ENGINE and not the production sidecar. The production host is
`realtime.sidecar.host.SidecarHost` (engine, compositor, LiveKit publishing); the Temporal
tests use this one because they exercise orchestration — placement, phases, fallbacks,
host death, limits — and must stay fast on two shared CPU cores.

What it really does (so the workflow has something true to observe):
- keeps sessions and slots (a session holds one from prepare_avatar to teardown; full => error);
- prepares the avatar from the file on disk: decodes every frame of the zip (Pillow) or the
  video (PyAV), reports progress per frame, caches a manifest by digest (second time: cache hit);
- probes outputs for real: LiveKit through livekit-server's `/rtc/validate` with the minted token,
  RTMP through an RTMP handshake (C0/C1 -> S0/S1/S2) with the server, any other registered kind
  by starting and closing its publisher; unreachable => raises;
- runs the session on a wall clock: stats grow at 25 idle frames/s, reported every stats
  interval; ends on stop, idle timeout (no audio ever arrives here), max duration, or
  `output_failed` once a test calls `lose_output` (its live output went away);
- switches a live session's output when the workflow asks (probing the new one for real), which
  makes a session whose run ended `output_failed` runnable again; it never fails over on its own;
- tears down idempotently.
It renders no pixels and publishes no media.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from realtime.host import (
    AvatarAsset,
    Capacity,
    OpenedOutput,
    OutputTarget,
    PreparedAvatar,
    PrepareProgress,
    RunLimits,
    SessionEnd,
    SessionEndReason,
    SessionStats,
    WarmUpResult,
)
from realtime.outputs.registry import OUTPUTS, LiveKitTarget, PublisherContext, RtmpTarget

logger = logging.getLogger(__name__)

FPS = 25
RTMP_HANDSHAKE_BYTES = 1536


class HostError(Exception):
    code = "host_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoFreeSlotError(HostError):
    code = "no_free_slot"


class UnknownSessionError(HostError):
    code = "unknown_session"


class OutputProbeError(HostError):
    code = "output_open_failed"


@dataclass
class _Session:
    session_id: str
    prepared: PreparedAvatar | None = None
    output: OpenedOutput | None = None
    output_opened_at_s: float | None = None
    stop_reason: SessionEndReason | None = None
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    output_lost: bool = False
    runtime_failure: str = ""  # set by `break_runtime`
    fallbacks: int = 0


class LoopbackSessionHost:
    def __init__(
        self,
        sidecar_id: str,
        task_queue: str,
        slots_total: int,
        cache_dir: Path,
        *,
        probe_timeout_s: float = 2.0,
        prepare_frame_delay_s: float = 0.0,
        warm_up_error: str = "",
    ) -> None:
        self.sidecar_id = sidecar_id
        self.task_queue = task_queue
        self.slots_total = slots_total
        self.cache_dir = cache_dir
        self.probe_timeout_s = probe_timeout_s
        self.prepare_frame_delay_s = prepare_frame_delay_s  # lets a test catch a session mid-prepare
        self.warm_up_error = warm_up_error  # when set, warm_up fails with it (an engine that cannot warm up)
        self.sessions: dict[str, _Session] = {}
        self.torn_down: list[str] = []
        self._warm = False

    def capacity(self) -> Capacity:
        return Capacity(
            sidecar_id=self.sidecar_id,
            task_queue=self.task_queue,
            slots_total=self.slots_total,
            slots_free=max(0, self.slots_total - len(self.sessions)),
        )

    async def prepare_avatar(
        self, session_id: str, asset: AvatarAsset, on_progress: Callable[[PrepareProgress], None]
    ) -> PreparedAvatar:
        session = self.sessions.get(session_id)
        if session is None:
            if len(self.sessions) >= self.slots_total:
                raise NoFreeSlotError(f"{self.sidecar_id}: all {self.slots_total} slots are in use")
            session = self.sessions[session_id] = _Session(session_id)
        manifest_path = self.cache_dir / asset.digest_sha256 / "manifest.json"
        cached = await asyncio.to_thread(_read_manifest, manifest_path)
        if cached is not None:
            frame_count, width, height = cached
            cache_hit = True
        else:
            loop = asyncio.get_running_loop()

            def progress(done: int, total: int) -> None:
                loop.call_soon_threadsafe(on_progress, PrepareProgress(frames_done=done, frames_total=total))
                if self.prepare_frame_delay_s:
                    time.sleep(self.prepare_frame_delay_s)

            try:
                frame_count, width, height = await asyncio.to_thread(_decode_all_frames, asset, progress)
            except Exception:
                self.sessions.pop(session_id, None)
                raise
            await asyncio.to_thread(_write_manifest, manifest_path, frame_count, width, height)
            cache_hit = False
        session.prepared = PreparedAvatar(
            digest_sha256=asset.digest_sha256,
            cache_dir=manifest_path.parent,
            frame_count=frame_count,
            width_px=width,
            height_px=height,
            cache_hit=cache_hit,
        )
        return session.prepared

    async def warm_up(self) -> WarmUpResult:
        if self.warm_up_error:
            raise HostError(self.warm_up_error)
        started = time.perf_counter()
        already = self._warm
        self._warm = True
        return WarmUpResult(
            engine="loopback-test-host",
            device="cpu",
            warm_up_ms=(time.perf_counter() - started) * 1000.0,
            already_warm=already,
        )

    async def open_output(
        self,
        session_id: str,
        target: OutputTarget,
        fallbacks: Sequence[OutputTarget] = (),
        switch_back_retry_s: float = 0.0,
    ) -> OpenedOutput:
        # No failover of its own (the real sidecar's is tested in tests/workflows/test_livekit_failover):
        # a lost output ends the run `output_failed`, which exercises the workflow's switch_output backstop.
        del fallbacks, switch_back_retry_s
        session = self._session(session_id)
        if session.prepared is None:
            raise HostError(f"session {session_id} has no prepared avatar")
        opened = await self._probe(target)
        session.output = opened
        session.output_opened_at_s = time.monotonic()
        return opened

    async def switch_output(self, session_id: str, target: OutputTarget) -> OpenedOutput:
        session = self._session(session_id)
        if session.output is None:
            raise HostError(f"session {session_id} has no open output to switch")
        opened = await self._probe(target)  # raises: the session stays as it was
        session.output = opened
        session.fallbacks += 1
        if session.output_lost:
            session.output_lost = False
            if session.stop_reason is SessionEndReason.OUTPUT_FAILED:
                session.stop_reason = None
                session.stop_event.clear()
        return opened

    def break_runtime(self, session_id: str, detail: str) -> None:
        """Test hook: the session's clock or render task died; run_session ends `runtime_failed` with
        `detail`."""
        session = self._session(session_id)
        session.runtime_failure = detail
        session.stop_event.set()

    def lose_output(self, session_id: str) -> None:
        """Test hook: the session's live output went away (its server died); run_session ends
        `output_failed`."""
        session = self._session(session_id)
        session.output_lost = True
        session.stop_event.set()

    async def run_session(
        self, session_id: str, limits: RunLimits, on_stats: Callable[[SessionStats], None]
    ) -> SessionEnd:
        session = self._session(session_id)
        if session.output is None or session.output_opened_at_s is None:
            raise HostError(f"session {session_id} has no open output")
        started_s = time.monotonic()
        while True:
            now = time.monotonic()
            stats = self._stats(session, now)
            reason = session.stop_reason
            if reason is None and session.runtime_failure:
                reason = SessionEndReason.RUNTIME_FAILED
            if reason is None and session.output_lost:
                reason = session.stop_reason = SessionEndReason.OUTPUT_FAILED
            if reason is None and now - started_s >= limits.max_duration_s:
                reason = SessionEndReason.MAX_DURATION
            if reason is None and now - started_s >= limits.idle_timeout_s:
                reason = SessionEndReason.IDLE_TIMEOUT  # no audio ever reaches this host
            on_stats(stats)
            if reason is not None:
                return SessionEnd(reason=reason, stats=stats, detail=session.runtime_failure)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.stop_event.wait(), timeout=limits.stats_interval_s)

    async def stop_session(self, session_id: str, reason: SessionEndReason) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            session.stop_reason = session.stop_reason or reason
            session.stop_event.set()

    async def teardown(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            session.stop_reason = session.stop_reason or SessionEndReason.STOPPED
            session.stop_event.set()
            self.torn_down.append(session_id)

    # --- internals ----------------------------------------------------------------------

    def _session(self, session_id: str) -> _Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise UnknownSessionError(f"no session {session_id} on {self.sidecar_id}")
        return session

    def _stats(self, session: _Session, now: float) -> SessionStats:
        assert session.output is not None and session.output_opened_at_s is not None
        frames = int((now - session.output_opened_at_s) * FPS)
        return SessionStats(
            session_id=session.session_id,
            output=session.output.kind,
            frames_published=frames,
            idle_frames=frames,
            fallbacks=session.fallbacks,
            extra={"sidecar_uptime_frames": float(frames)},
        )

    async def _probe(self, target: OutputTarget) -> OpenedOutput:
        if isinstance(target.target, LiveKitTarget):
            await self._probe_livekit(target.target.url, target.target.token)
            return OpenedOutput(target.kind, target.target.room)
        if isinstance(target.target, RtmpTarget):
            await self._probe_rtmp(target.target.url)
            parts = urlsplit(target.target.url)
            return OpenedOutput(target.kind, f"{parts.scheme}://{parts.hostname}:{parts.port}{parts.path}")
        # Any other registered kind: its own publisher connects and closes again (what it opens is real).
        kind = OUTPUTS.get(target.kind)
        context = PublisherContext(target.kind, 32, 32, 0.0, 0, 0.0)
        opened = kind.open(target.target, context)
        try:
            await opened.publisher.start()
        except Exception as exc:
            raise OutputProbeError(f"{target.kind} output did not open: {exc}") from exc
        await opened.publisher.close()
        return OpenedOutput(target.kind, opened.detail)

    async def _probe_livekit(self, url: str, token: str) -> None:
        parts = urlsplit(url)
        scheme = "https" if parts.scheme in ("wss", "https") else "http"
        validate_url = f"{scheme}://{parts.netloc}/rtc/validate"
        try:
            async with httpx.AsyncClient(timeout=self.probe_timeout_s, trust_env=False) as client:
                response = await client.get(validate_url, params={"access_token": token})
        except httpx.HTTPError as exc:
            raise OutputProbeError(f"LiveKit at {url} is unreachable: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise OutputProbeError(
                f"LiveKit at {url} refused the token: HTTP {response.status_code} {response.text}"
            )

    async def _probe_rtmp(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "rtmp" or not parts.hostname:
            raise OutputProbeError(f"{url!r} is not an rtmp:// URL")
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 1935)
                try:
                    writer.write(b"\x03" + bytes(RTMP_HANDSHAKE_BYTES))  # C0 (version 3) + C1
                    await writer.drain()
                    s0s1s2 = await reader.readexactly(1 + 2 * RTMP_HANDSHAKE_BYTES)
                    if s0s1s2[0] != 3:
                        raise OutputProbeError(f"{url}: not an RTMP server (version byte {s0s1s2[0]})")
                    writer.write(s0s1s2[1 : 1 + RTMP_HANDSHAKE_BYTES])  # C2 echoes S1
                    await writer.drain()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise OutputProbeError(
                f"RTMP server at {url} is unreachable: {type(exc).__name__}: {exc}"
            ) from exc


def _decode_all_frames(asset: AvatarAsset, progress: Callable[[int, int], None]) -> tuple[int, int, int]:
    if asset.kind == "frames_zip":
        from PIL import Image

        with zipfile.ZipFile(asset.path) as archive:
            names = sorted(n for n in archive.namelist() if n.lower().endswith((".png", ".jpg", ".jpeg")))
            size = (0, 0)
            for index, name in enumerate(names):
                with Image.open(io.BytesIO(archive.read(name))) as image:
                    image.load()
                    size = image.size
                progress(index + 1, len(names))
            return len(names), size[0], size[1]
    import av

    with av.open(str(asset.path)) as container:
        count = 0
        width = height = 0
        for frame in container.decode(video=0):
            count += 1
            width, height = frame.width, frame.height
            progress(count, 0)
        return count, width, height


def _read_manifest(path: Path) -> tuple[int, int, int] | None:
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return int(manifest["frame_count"]), int(manifest["width_px"]), int(manifest["height_px"])


def _write_manifest(path: Path, frame_count: int, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"frame_count": frame_count, "width_px": width, "height_px": height}))
    partial.replace(path)
