"""Command-line options that every Temporal worker process shares (`lipsync worker`, `lipsync sidecar`):
where Temporal is, how many placement registries a pool has, where avatar assets are kept."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ASSET_DIR_ENV = "LIPSYNC_ASSET_DIR"
PLACEMENT_SHARDS_ENV = "LIPSYNC_PLACEMENT_SHARDS"

# An argument parser or one of its groups.
ArgumentTarget = argparse.ArgumentParser | argparse._ArgumentGroup


def add_connection_arguments(parser: ArgumentTarget) -> None:
    parser.add_argument(
        "--temporal-address",
        default=os.environ.get("TEMPORAL_ADDRESS", "127.0.0.1:7233"),
        help="Temporal frontend host:port (default $TEMPORAL_ADDRESS or 127.0.0.1:7233)",
    )
    parser.add_argument(
        "--namespace", default=os.environ.get("TEMPORAL_NAMESPACE", "default"), help="Temporal namespace"
    )


def add_placement_shards_argument(parser: ArgumentTarget) -> None:
    parser.add_argument(
        "--placement-shards",
        type=int,
        default=int(os.environ.get(PLACEMENT_SHARDS_ENV, "1")),
        help="placement registries per pool; the same on every worker and sidecar (default "
        f"${PLACEMENT_SHARDS_ENV} "
        "or 1; docs/scaling.md)",
    )


def asset_dir(given: Path | None, default: Path) -> Path:
    """`--asset-dir`, else $LIPSYNC_ASSET_DIR, else `default`."""
    return given or Path(os.environ.get(ASSET_DIR_ENV) or default)
