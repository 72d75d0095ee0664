"""The `lipsync` command. Each subcommand group lives in its own module with a `register(subparsers)`.

Subcommand modules import heavy packages (torch, livekit) only inside their handlers, so
`lipsync --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Modules that contribute subcommands, in help order.
SUBCOMMAND_MODULES = (
    "infra.cli.stack",
    "infra.cli.api",
    "infra.cli.worker",
    "infra.cli.demo",
    "infra.cli.models",
    "infra.cli.engine",
    "infra.cli.render",
    "infra.cli.sidecar",
    "infra.cli.session",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lipsync",
        description="lipsync-live: realtime MuseTalk lip-sync avatars published to LiveKit (RTMP fallback), "
        "orchestrated by Temporal.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return int(handler(args))


if __name__ == "__main__":
    sys.exit(main())
