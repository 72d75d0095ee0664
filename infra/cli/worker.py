"""`lipsync worker`: the control-plane Temporal worker (Session/Placement workflows, asset and placement
activities).

Scale it by running more replicas; they share the `lipsync-control` queue. GPU work never runs here: it goes
to each sidecar's own queue (see activities/sidecar_worker.py). The worker itself is assembled by
activities/worker.py; this module is its command line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from infra.cli.temporal_options import (
    ASSET_DIR_ENV,
    add_connection_arguments,
    add_placement_shards_argument,
    asset_dir,
)
from infra.paths import cache_dir


def register(subparsers: Any) -> None:
    worker = subparsers.add_parser(
        "worker", help="run the control-plane Temporal worker (workflows + asset activities)"
    )
    add_connection_arguments(worker)
    worker.add_argument("--task-queue", default=None, help="control task queue (default lipsync-control)")
    worker.add_argument(
        "--asset-dir",
        type=Path,
        default=None,
        help=f"where downloaded avatar assets are stored (default ${ASSET_DIR_ENV} or <cache>/assets)",
    )
    worker.add_argument(
        "--placement-id", default=None, help="PlacementWorkflow id (default lipsync-placement)"
    )
    add_placement_shards_argument(worker)
    worker.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:

    from activities.control import ControlConfig  # noqa: PLC0415 (lipsync --help stays fast)
    from activities.placement_client import check_shards  # noqa: PLC0415 (lipsync --help stays fast)
    from activities.worker import build_control_worker  # noqa: PLC0415 (lipsync --help stays fast)
    from infra.telemetry import TelemetryConfigError, configure_tracing  # noqa: PLC0415 (lipsync --help stays fast)
    from workflows.contracts import CONTROL_TASK_QUEUE, PLACEMENT_WORKFLOW_ID  # noqa: PLC0415 (lipsync --help stays fast)
    from workflows.temporal_client import connect_client  # noqa: PLC0415 (lipsync --help stays fast)

    logger = logging.getLogger("lipsync.worker")
    try:
        configure_tracing("lipsync-worker")
    except TelemetryConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    try:
        shards = check_shards(args.placement_shards)
    except ValueError as exc:
        sys.stderr.write(f"error: --placement-shards: {exc}\n")
        return 2
    assets = asset_dir(args.asset_dir, cache_dir() / "assets")
    config = ControlConfig(
        asset_dir=assets,
        placement_workflow_id=args.placement_id or PLACEMENT_WORKFLOW_ID,
        task_queue=args.task_queue or CONTROL_TASK_QUEUE,
        shards=shards,
    )

    async def main() -> int:
        try:
            client = await connect_client(args.temporal_address, args.namespace)
        except RuntimeError as exc:  # the SDK's "Failed client connect: ..." (refused, DNS, TLS)
            sys.stderr.write(f"error: cannot reach Temporal at {args.temporal_address}: {exc}\n")
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with build_control_worker(client, config):
            logger.info(
                "control worker running",
                extra={"queue": config.task_queue, "temporal": args.temporal_address, "assets": str(assets)},
            )
            await stop.wait()
        logger.info("control worker stopped")
        return 0

    return asyncio.run(main())
