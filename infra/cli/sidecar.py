"""`lipsync sidecar`: run the realtime sidecar (audio ingest, engine, LiveKit publishing) in the foreground.

With its Temporal worker (activities/sidecar_worker.py) on the sidecar's own task queue, registered
with placement, unless --no-temporal (then it is the standalone `python -m realtime`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    sidecar = subparsers.add_parser(
        "sidecar",
        help="run the realtime sidecar: Temporal worker on its own queue, WS audio ingest, engine, publishing",
        description="Run the sidecar until Ctrl-C. Endpoints: WS /v1/sessions/{id}/audio (and /audio?session_id=), "
        "GET /healthz, GET /v1/sessions/{id}/stats, dev control POST/DELETE /v1/sessions/{id} (with --dev-api). "
        "Every route but the bare /healthz needs the secret shared with the API ($LIPSYNC_SIDECAR_SECRET).",
    )
    from activities.sidecar_worker import add_temporal_arguments
    from realtime.sidecar.config import add_arguments

    add_arguments(sidecar)
    add_temporal_arguments(sidecar)
    sidecar.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from activities.sidecar_worker import sidecar_worker_service, temporal_options_from_args
    from infra.paths import cache_dir
    from infra.telemetry import TelemetryConfigError, configure_tracing
    from realtime.sidecar.auth import SecretError
    from realtime.sidecar.config import settings_from_args
    from realtime.sidecar.process import run

    try:
        options = temporal_options_from_args(args, cache_dir() / "assets")
        settings = settings_from_args(args)
    except (ValueError, SecretError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if options is None:
        return run(settings)
    try:
        configure_tracing("lipsync-sidecar")
    except TelemetryConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    return run(settings, services=[sidecar_worker_service(options)])
