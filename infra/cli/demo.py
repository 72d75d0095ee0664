"""`lipsync demo`: the README's main job. For now it brings up the embedded stack and says what it started."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    demo = subparsers.add_parser("demo", help="bring up the embedded local stack and show where everything listens")
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from infra import stack
    from infra.cli.stack import print_table

    rows = stack.status()
    if not any(row.running for row in rows):
        try:
            rows = stack.up()
        except stack.StackError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 1
    sys.stdout.write("lipsync-live demo: the embedded stack is up.\n")
    print_table(rows, as_json=False)
    sys.stdout.write(
        "Temporal UI: the 'UI' address above. Stop everything with `.venv/bin/lipsync stack down`.\n"
        "(The session pipeline — worker, sidecar, API and a real session — arrives with the next issues.)\n"
    )
    return 0 if all(row.healthy for row in rows) else 1
