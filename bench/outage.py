"""Temporal outage at a real LiveKit subscriber: how long a live session survives with Temporal down.

    python -m bench.outage --outage-s 300 [--json bench/results/chaos-outage-cpu-<yyyymmdd>.json]

A real Temporal dev server on a database file, the production control worker (in this process),
one real `lipsync sidecar` process (preview engine) publishing to a real livekit-server, and a
subscriber (tests/support/avcheck.RoomRecorder) that records every frame's arrival. With the
session live, Temporal is stopped for `--outage-s`, then started again on the same database.
Reported: the longest gap between two frames at the subscriber from the outage on, next to the
same figure over the 20 s before it (the machine's own baseline), whether the workflow
reconciled with the sidecar and carried on (no loss, same sidecar), and how it ended on stop.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from temporalio.client import Client

from bench.machine import cpu_name
from infra import livekit, temporal
from infra.demo import avatar_zip_bytes, serve_directory
from realtime.outputs.registry import LiveKitParams
from tests.support.outputs import output_request
from tests.support.restartable_temporal import RestartableTemporal
from workflows.client import stop_session
from workflows.contracts import Phase
from workflows.session import SessionWorkflow


async def run(outage_s: float, work_dir: Path) -> dict[str, Any]:
    from tests.support.avcheck import RoomRecorder, token  # noqa: PLC0415 (tests/ is not installed with the package)
    from tests.support.sidecar_process import SidecarProcesses  # noqa: PLC0415 (tests/ is not installed with the package)
    from tests.support.temporal_harness import Harness, fast_policy, wait_for_status  # noqa: PLC0415 (tests/ is not installed with the package)

    server = RestartableTemporal(
        temporal.TemporalDevServerConfig(db_file=work_dir / "temporal.db").with_free_ports(),
        work_dir / "temporal.log",
    )
    lk_config = livekit.LiveKitServerConfig().with_free_ports()
    lk = livekit.server_process(lk_config, work_dir / "livekit")
    server.start()
    lk.start()
    assets = work_dir / "assets"
    assets.mkdir()
    (assets / "astronaut.zip").write_bytes(avatar_zip_bytes())
    viewer: RoomRecorder | None = None
    try:
        client = await Client.connect(server.config.target, namespace=temporal.NAMESPACE)
        async with Harness(client, work_dir / "harness", lease_s=15.0, registration_interval_s=5.0) as world:
            sidecars = SidecarProcesses(
                server.config.target,
                world,
                work_dir,
                livekit_credentials=(lk_config.api_key, lk_config.api_secret),
                lease_s=15.0,
                registration_interval_s=5.0,
            )
            try:
                sidecar_id = await sidecars.spawn("a")
                with serve_directory(assets) as assets_url:
                    request = world.request(
                        f"{assets_url}/astronaut.zip",
                        output_request(livekit=LiveKitParams(url=lk_config.ws_url, identity="avatar-outage")),
                    )
                    # Production timeouts (infra/policies.yaml), with the loopback asset server allowed.
                    policy = fast_policy(
                        **{
                            key.replace(".", "__"): value
                            for key, value in {
                                "session.idle_timeout_s": 3600.0,
                                "session.max_duration_s": 7200.0,
                                "session.stats_interval_s": 2.0,
                                "session.stats_report_interval_s": 15.0,
                                "activities.run_session.heartbeat_timeout_s": 10.0,
                                "activities.run_session.reconcile_s": 15.0,
                                "activities.run_session.schedule_to_start_s": 10.0,
                            }.items()
                        }
                    )
                    handle = await world.start(request, policy)
                    await wait_for_status(handle, lambda s: s.phase is Phase.LIVE, timeout_s=120)
                viewer = RoomRecorder(mouth_box=(0, 0, 16, 16))
                await viewer.connect(lk_config.ws_url, token(lk_config, "viewer", request.room))
                await viewer.wait_for(lambda: len(viewer.frames) >= 50, 60)
                await asyncio.sleep(20.0)  # a baseline: the same subscriber with Temporal up

                down_at = time.monotonic()
                await asyncio.to_thread(server.stop)
                await asyncio.sleep(outage_s)
                await asyncio.to_thread(server.start)
                up_at = time.monotonic()
                back = datetime.now(UTC)
                await wait_for_status(
                    handle,
                    lambda s: (
                        bool(s.stats_reported_at) and datetime.fromisoformat(s.stats_reported_at) > back
                    ),
                    timeout_s=120,
                )
                await asyncio.sleep(30.0)  # a heartbeat timeout and a reconcile later: still live?
                status = await handle.query(SessionWorkflow.status)
                arrivals = [frame.arrival_s for frame in viewer.frames if frame.arrival_s >= down_at - 1.0]
                gaps = [b - a for a, b in itertools.pairwise(arrivals)]
                before = [f.arrival_s for f in viewer.frames if down_at - 20.0 <= f.arrival_s < down_at]
                gaps_before = [b - a for a, b in itertools.pairwise(before)]
                during = [f for f in viewer.frames if down_at <= f.arrival_s <= up_at]
                await stop_session(client, request.session_id)
                result = await handle.result()
                return {
                    "outage_s": round(up_at - down_at, 1),
                    "frames_during_outage": len(during),
                    "fps_during_outage": round(len(during) / (up_at - down_at), 2),
                    "max_frame_gap_ms": round(max(gaps) * 1000, 1) if gaps else None,
                    "max_frame_gap_ms_before_outage": round(max(gaps_before) * 1000, 1)
                    if gaps_before
                    else None,
                    "phase_after": status.phase.value,
                    "sidecar_after": status.sidecar,
                    "same_sidecar": status.sidecar == sidecar_id,
                    "reconciles": status.reconciles,
                    "sidecar_losses": len(status.sidecar_losses),
                    "replacements": status.replacements,
                    "end_reason": result.end_reason.value,
                }
            finally:
                sidecars.stop_all()
    finally:
        if viewer is not None:
            await viewer.close()
        lk.stop()
        server.stop_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.outage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage-s", type=float, default=300.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--notes", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    with tempfile.TemporaryDirectory(prefix="bench-outage-") as tmp:
        summary = asyncio.run(run(args.outage_s, Path(tmp)))
    document = {
        "benchmark": "chaos",
        "device": cpu_name(),
        "torch": None,
        "settings": {
            "engine": "preview",
            "fault": "Temporal dev server stopped, then started on the same database",
            "subscriber": "real livekit-server, RoomRecorder",
            "notes": args.notes,
        },
        "summary": {"temporal_outage_s_survived": summary["outage_s"], **summary},
        "results": [summary],
    }
    print(json.dumps(document["summary"], indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    ok = (
        summary["phase_after"] == "live"
        and summary["sidecar_losses"] == 0
        and summary["end_reason"] == "stopped"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
