"""The whole service in this process, for tests of its clients (the Python client, the CLI, the integrations).

Real parts: the test's Temporal dev server and livekit-server, the production control worker
(`Harness`), the production sidecar (`realtime.sidecar.process.serve` with its Temporal worker,
CPU preview engine) and the API served by uvicorn on a free loopback port. The avatar is the
astronaut face served from a loopback asset server the policy allow-lists.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from activities.sidecar import SidecarWorkerConfig
from activities.sidecar_worker import run_sidecar_worker
from api.app import create_app
from api.settings import ApiSettings
from infra.demo import avatar_zip_bytes
from infra.livekit import LiveKitServerConfig
from infra.process import free_port
from infra.temporal import TemporalDevServerConfig
from realtime.sidecar.config import HostConfig, ServerConfig, SidecarSettings
from tests.support.asgi_server import serve_asgi
from tests.support.asset_server import AssetServer
from tests.support.credentials import SIDECAR_SECRET
from tests.support.temporal_harness import Harness, fast_policy
from workflows.contracts import sidecar_task_queue
from workflows.temporal_client import connect_client

API_KEY = "integration-key"
AVATAR_SIDE_PX = 256
# Heartbeats from a real sidecar on a loaded 2-core machine: generous, still far below production's.
SIDECAR_POLICY = {
    f"activities__{name}__heartbeat_timeout_s": 10.0
    for name in ("prepare_avatar", "warm_up", "open_output", "run_session", "stop_session", "teardown")
}


@dataclass
class ApiStack:
    api_url: str
    api_key: str
    harness: Harness
    livekit: LiveKitServerConfig
    avatar_url: str
    sidecar_url: str
    assets: AssetServer  # serves the avatar; tests add routes (slow, broken) to it


@contextlib.asynccontextmanager
async def api_stack(
    temporal_dev_server: TemporalDevServerConfig,
    livekit_server: LiveKitServerConfig,
    work_dir: Path,
    *,
    slots: int = 2,
    policy_overrides: dict[str, Any] | None = None,
    api_keys: tuple[str, ...] = (API_KEY,),
    admin_keys: tuple[str, ...] = (),
) -> AsyncIterator[ApiStack]:
    from realtime.sidecar.process import serve

    client = await connect_client(temporal_dev_server.target)
    credentials = (livekit_server.api_key, livekit_server.api_secret)
    assets = AssetServer().start()
    async with Harness(client, work_dir, livekit_credentials=credentials) as harness:
        sidecar_id = harness.sidecar_id("real")
        sidecar_port, api_port = free_port(), free_port()
        registered = asyncio.Event()

        async def temporal_side(host: Any) -> None:
            config = SidecarWorkerConfig.for_host(
                host,
                work_dir / "sidecar-assets",
                control_task_queue=harness.control_queue,
                placement_workflow_id=harness.placement_id,
                lease_s=10.0,
                registration_interval_s=1.0,
                livekit_api_key=livekit_server.api_key,
                livekit_api_secret=livekit_server.api_secret,
            )
            await run_sidecar_worker(client, host, config, ready=registered)

        settings = SidecarSettings(
            port=sidecar_port,
            engine="preview",
            device="cpu",
            cache_dir=work_dir / "avatar-cache",
            host=HostConfig(
                sidecar_id=sidecar_id, task_queue=sidecar_task_queue(sidecar_id), slots_total=slots
            ),
            server=ServerConfig(service_secret=SIDECAR_SECRET, stats_interval_ms=0),
        )
        sidecar = asyncio.create_task(serve(settings, services=[temporal_side]))
        api_settings = ApiSettings(
            api_keys=api_keys,
            admin_keys=admin_keys,
            livekit_url=livekit_server.ws_url,
            livekit_api_key=livekit_server.api_key,
            livekit_api_secret=livekit_server.api_secret,
            control_task_queue=harness.control_queue,
            placement_workflow_id=harness.placement_id,
            sidecar_urls={sidecar_id: f"http://127.0.0.1:{sidecar_port}"},
            public_base_url=f"http://127.0.0.1:{api_port}",
            sidecar_secret=SIDECAR_SECRET,
        )
        policy = fast_policy(**{**SIDECAR_POLICY, **(policy_overrides or {})})
        app = create_app(api_settings, temporal_client=client, policy=policy)
        try:
            async with serve_asgi(app, port=api_port, name="API") as api_url:
                await asyncio.wait_for(registered.wait(), 60)
                avatar_url = assets.serve(
                    "/astronaut.zip", avatar_zip_bytes(side_px=AVATAR_SIDE_PX), "application/zip"
                )
                yield ApiStack(
                    api_url=api_url,
                    api_key=api_keys[0],
                    harness=harness,
                    livekit=livekit_server,
                    avatar_url=avatar_url,
                    sidecar_url=f"http://127.0.0.1:{sidecar_port}",
                    assets=assets,
                )
        finally:
            sidecar.cancel()
            await asyncio.gather(sidecar, return_exceptions=True)
            assets.stop()


def gray(frame_rgb: np.ndarray) -> np.ndarray:
    return np.asarray(frame_rgb, dtype=np.float32).mean(axis=2)


def lips_move_with_speech(
    frames: list[Any],
    first_speech_frame_id: int,
    loud_frame_offsets: list[int],
    side_px: int = AVATAR_SIDE_PX,
) -> tuple[float, float, int, int]:
    """(speech change, idle change, idle frames, speech frames) of the received mouth region.

    Idle frames are those before the speech began; speech frames those whose audio was loud.
    The change is the 99.5th percentile of the difference from the median idle mouth.
    """
    full = [f for f in frames if (f.width_px, f.height_px) == (side_px, side_px)]
    idle = [f for f in full if 0 <= f.frame_id < first_speech_frame_id - 2]
    loud = {first_speech_frame_id + k for k in loud_frame_offsets}
    spoken = [f for f in full if f.frame_id in loud]
    if len(idle) < 10 or not spoken:
        return 0.0, 0.0, len(idle), len(spoken)
    reference = np.median(np.stack([gray(f.mouth) for f in idle[-25:]]), axis=0)

    def change(frame: Any) -> float:
        return float(np.percentile(np.abs(gray(frame.mouth) - reference), 99.5))

    idle_change = float(np.median([change(f) for f in idle[-25:]]))
    speech_change = float(np.median([change(f) for f in spoken]))
    return speech_change, idle_change, len(idle), len(spoken)


def loud_frame_offsets(pcm_s16le_16khz: bytes, fraction: float = 0.3) -> list[int]:
    """Indices (from the utterance's first frame) of the 40 ms frames whose RMS is above `fraction` of the
    loudest."""
    speech = np.frombuffer(pcm_s16le_16khz, dtype="<i2").astype(np.float32) / 32768.0
    per_frame = speech[: len(speech) // 640 * 640].reshape(-1, 640)
    level = np.sqrt((per_frame**2).mean(axis=1))
    return [int(k) for k in np.nonzero(level > fraction * level.max())[0]]


def heard_speech_correlation(
    heard_48k: np.ndarray, sent_48k: np.ndarray, *, block_s: float = 1.0, search_s: float = 0.6
) -> float:
    """Median over the sent speech's 1 s blocks of the best 10 ms-envelope correlation with what was heard.

    Each block is matched near the whole utterance's alignment (within `search_s`), so a receiver's
    concealment gap (a CPU stall on a loaded machine shifts what follows) costs one block, not the
    whole measure. Silence or another sound scores near 0; the sent speech near 1.
    """
    from tests.support.avcheck import align, envelope

    lag, _ = align(heard_48k, sent_48k)
    heard, sent = envelope(heard_48k, 48_000), envelope(sent_48k, 48_000)  # 100 values per second
    offset, block, search = lag // 480, int(block_s * 100), int(search_s * 100)
    scores = []
    for start in range(0, len(sent) - block + 1, block):
        reference = sent[start : start + block]
        if reference.std() < 0.05 * sent.max():
            continue  # a pause in the speech: nothing to match
        candidates = [
            float(np.corrcoef(reference, heard[at : at + block])[0, 1])
            for at in range(offset + start - search, offset + start + search + 1)
            if at >= 0 and at + block <= len(heard) and heard[at : at + block].std() > 0
        ]
        scores.append(max(candidates, default=0.0))
    return float(np.median(scores)) if scores else 0.0
