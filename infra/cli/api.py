"""`lipsync api`: serve the FastAPI edge with uvicorn."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    api = subparsers.add_parser("api", help="serve the HTTP API (sessions, tokens, health, debug, metrics)")
    api.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    api.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    api.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn  # noqa: PLC0415 (heavy: uvicorn)

    from api.app import create_app  # noqa: PLC0415 (lipsync --help stays fast)
    from api.policy_file import PolicyError, load_policies  # noqa: PLC0415 (lipsync --help stays fast)
    from api.settings import ApiSettings, SettingsError  # noqa: PLC0415 (lipsync --help stays fast)
    from infra.telemetry import TelemetryConfigError, configure_tracing  # noqa: PLC0415 (lipsync --help stays fast)

    try:
        settings = ApiSettings.from_env()
        # Sessions carry this policy in their input: a bad file is refused now, not at the first request.
        policy = load_policies(settings.policies_path)
        configure_tracing("lipsync-api")
    except (SettingsError, TelemetryConfigError, PolicyError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    uvicorn.run(create_app(settings, policy=policy), host=args.host, port=args.port, log_level="info")
    return 0
