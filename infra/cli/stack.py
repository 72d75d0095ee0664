"""`lipsync stack up|down|status`: the embedded local stack for development and the demo."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: Any) -> None:
    stack = subparsers.add_parser(
        "stack", help="start, inspect or stop the local Temporal + LiveKit + nginx-rtmp stack"
    )
    actions = stack.add_subparsers(dest="stack_action", metavar="ACTION", required=True)
    up = actions.add_parser("up", help="start the three services in the background")
    up.add_argument(
        "--free-ports",
        action="store_true",
        help="pick free loopback ports instead of the defaults (7233, 7880, 1935, ...)",
    )
    up.set_defaults(handler=_up)
    status = actions.add_parser(
        "status", help="show each service's pid, health and endpoint; exit 1 if any is unhealthy"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)
    down = actions.add_parser("down", help="stop every service the stack started")
    down.set_defaults(handler=_down)


def print_table(rows: list[Any], as_json: bool) -> None:
    if as_json:
        json.dump([row.as_dict() for row in rows], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    for row in rows:
        state = "healthy" if row.healthy else ("running, unhealthy" if row.running else "stopped")
        sys.stdout.write(f"{row.name:<11} {state:<19} pid={row.pid!s:<8} {row.endpoint}\n")


def _up(args: argparse.Namespace) -> int:
    from infra import stack  # noqa: PLC0415 (lipsync --help stays fast)

    try:
        # On purpose in the background: the one stack that outlives the command that started it.
        rows = stack.up(stack.StackPorts.free() if args.free_ports else None, detached=True)
    except stack.StackError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    sys.stdout.write("started the local stack:\n")
    print_table(rows, as_json=False)
    return 0 if all(row.healthy for row in rows) else 1


def _status(args: argparse.Namespace) -> int:
    from infra import stack  # noqa: PLC0415 (lipsync --help stays fast)

    rows = stack.status()
    print_table(rows, as_json=args.json)
    return 0 if all(row.healthy for row in rows) else 1


def _down(args: argparse.Namespace) -> int:
    from infra import stack  # noqa: PLC0415 (lipsync --help stays fast)

    stopped = stack.down()
    sys.stdout.write(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}\n")
    return 0
