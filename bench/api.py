"""API benchmark: N sessions started concurrently through the HTTP API on a real local deployment.

    python -m bench.api --sessions 50 --json bench/results/api-cpu-<yyyymmdd>.json
        [--sidecars 2] [--slots 4] [--engine preview] [--place-timeout-s 20] [--settle-timeout-s 120]

Deployment (all on 127.0.0.1, free ports, a temp dir, stopped at the end): the embedded stack
(Temporal dev server, livekit-server, nginx-rtmp), one `lipsync worker`, `--sidecars` ×
`lipsync sidecar --slots S` and one `lipsync api`, as separate processes (so the API's latency
is its own, not shared with the engine's event loop). The avatar (the demo's astronaut) is
served by a loopback server that the policy allow-lists.

Measured:
- `start_*_ms`: latency of each `POST /v1/sessions` while N are sent at once (p50/p99/max);
- every session is then followed (GET /v1/sessions/{id}, whose latency is also reported) until
  it is `live` or has ended with an error code — "a clear failure". Sessions beyond the
  sidecars' total slots wait for a slot (place_session retries) up to `--place-timeout-s`
  and then fail: `no_capacity` when the last retry says so, `activity_timeout` when
  place_session's schedule-to-close ends the wait first (the workflow's classification);
- `time_to_live_*_ms`: POST sent -> status first seen `live` (each client polls once a second);
- then every session is stopped (`POST .../stop`, latency reported) and followed to its end.

`sessions_unsettled` (neither live nor failed with a code within `--settle-timeout-s`) must be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.machine import cpu_name
from infra import stack
from infra.demo import avatar_zip_bytes, demo_policies, serve_directory
from infra.paths import PROJECT_ROOT
from infra.process import ManagedProcess, free_port, http_ok, wait_until
from realtime.engine.registry import engine_choices

logger = logging.getLogger("bench.api")

POLL_S = 1.0  # how often each simulated client polls its session (a realistic client, not a load test)
TERMINAL = {"completed", "failed", "cancelled"}


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


class Deployment:
    """The processes of a local deployment on free ports (what `lipsync demo` runs, with N sidecars)."""

    def __init__(
        self, work_dir: Path, sidecars: int, slots: int, engine: str, place_timeout_s: float
    ) -> None:
        self.work_dir = work_dir
        self.sidecar_count = sidecars
        self.slots = slots
        self.engine = engine
        self.place_timeout_s = place_timeout_s
        self.ports = stack.StackPorts.free()
        self.stack_dir = work_dir / "stack"
        self.api_port = free_port()
        self.sidecar_ports = {f"bench-sidecar-{i}": free_port() for i in range(sidecars)}
        self.sidecar_secret = secrets.token_hex(32)  # shared by this deployment's API and sidecars
        self.api_key = "bench-" + secrets.token_hex(8)
        self.admin_key = "bench-admin-" + secrets.token_hex(8)  # /metrics is admin-only
        self.processes: list[Any] = []
        self.stack_up = False

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict[str, str]:
        policies = demo_policies(
            self.work_dir,
            {
                # Waiting for a slot ends after this long with no_capacity (the "clear failure").
                "activities.place_session.schedule_to_close_s": self.place_timeout_s,
                "activities.place_session.start_to_close_s": min(5.0, self.place_timeout_s),
                "activities.place_session.retry.maximum_interval_s": 2.0,
            },
        )
        return {
            **stack.service_env(self.ports),
            "LIPSYNC_API_KEYS": self.api_key,
            "LIPSYNC_ADMIN_KEYS": self.admin_key,
            "LIPSYNC_SIDECAR_URLS": ",".join(
                f"{sid}=http://127.0.0.1:{port}" for sid, port in self.sidecar_ports.items()
            ),
            "LIPSYNC_SIDECAR_SECRET": self.sidecar_secret,
            "LIPSYNC_POLICIES": str(policies),
            "LIPSYNC_PUBLIC_BASE_URL": self.api_url,
            "LIPSYNC_TRACE_EXPORTER": "none",
            "PYTHONUNBUFFERED": "1",
        }

    def start(self) -> None:
        stack.up(self.ports, self.stack_dir)
        self.stack_up = True
        env = self.env()
        lipsync = [sys.executable, "-m", "infra.cli", "--log-level", "WARNING"]
        temporal = f"127.0.0.1:{self.ports.temporal}"

        def launch(name: str, argv: list[str], health: Any, timeout_s: float = 90.0) -> None:
            process = ManagedProcess(
                name=name,
                argv=argv,
                log_path=self.work_dir / "logs" / f"{name}.log",
                health=health,
                cwd=PROJECT_ROOT,
                env=env,
                startup_timeout_s=timeout_s,
            )
            self.processes.append(process)
            process.start()

        started = time.monotonic()
        launch(
            "worker",
            [
                *lipsync,
                "worker",
                "--temporal-address",
                temporal,
                "--asset-dir",
                str(self.work_dir / "worker-assets"),
            ],
            lambda: time.monotonic() - started > 2.0,
        )
        for sidecar_id, port in self.sidecar_ports.items():
            launch(
                sidecar_id,
                [
                    *lipsync,
                    "sidecar",
                    "--port",
                    str(port),
                    "--engine",
                    self.engine,
                    "--sidecar-id",
                    sidecar_id,
                    "--slots",
                    str(self.slots),
                    "--temporal-address",
                    temporal,
                    "--asset-dir",
                    str(self.work_dir / f"{sidecar_id}-assets"),
                    "--cache-dir",
                    str(self.work_dir / f"{sidecar_id}-cache"),
                ],
                lambda port=port: http_ok(f"http://127.0.0.1:{port}/healthz"),
            )
        launch(
            "api", [*lipsync, "api", "--port", str(self.api_port)], lambda: http_ok(f"{self.api_url}/healthz")
        )
        if not wait_until(lambda: http_ok(f"{self.api_url}/readyz", timeout_s=6.0), 120.0, 0.5):
            raise RuntimeError(f"the API never became ready; logs in {self.work_dir / 'logs'}")

    def stop(self) -> None:
        for process in reversed(self.processes):
            try:
                process.stop()
            except Exception as exc:  # keep stopping the others
                logger.warning("stop failed: %s", exc)
        if self.stack_up:
            stack.down(self.stack_dir)


async def run_sessions(
    deployment: Deployment, sessions: int, settle_timeout_s: float, avatar_url: str
) -> dict[str, Any]:
    headers = {"X-API-Key": deployment.api_key}
    limits = httpx.Limits(max_connections=sessions + 10, max_keepalive_connections=sessions + 10)
    status_ms: list[float] = []
    async with httpx.AsyncClient(
        base_url=deployment.api_url, headers=headers, timeout=60, limits=limits
    ) as http:

        async def start(index: int) -> dict[str, Any]:
            body = {
                "session_id": f"bench-{index:03d}-{secrets.token_hex(3)}",
                "avatar": {"frames_zip_url": avatar_url},
                "output": {"livekit": {"room": f"bench-room-{index:03d}"}},
            }
            sent = time.perf_counter()
            response = await http.post("/v1/sessions", json=body)
            latency_ms = (time.perf_counter() - sent) * 1000
            return {
                "id": body["session_id"],
                "sent": sent,
                "start_ms": latency_ms,
                "http": response.status_code,
                "body": response.json(),
            }

        wall = time.perf_counter()
        started = await asyncio.gather(*(start(i) for i in range(sessions)))
        start_wall_ms = (time.perf_counter() - wall) * 1000

        async def follow(entry: dict[str, Any]) -> None:
            if entry["http"] != 201:
                entry["outcome"] = f"http_{entry['http']}:{entry['body'].get('code')}"
                return
            deadline = time.monotonic() + settle_timeout_s
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                status = (await http.get(f"/v1/sessions/{entry['id']}")).json()
                status_ms.append((time.perf_counter() - t0) * 1000)
                if status["phase"] == "live":
                    entry["outcome"] = "live"
                    entry["live_ms"] = (time.perf_counter() - entry["sent"]) * 1000
                    return
                if status["phase"] in TERMINAL:
                    error = status.get("error") or {}
                    entry["outcome"] = f"failed:{error.get('code', 'no_code')}" if error else status["phase"]
                    return
                await asyncio.sleep(POLL_S)
            entry["outcome"] = "unsettled"

        await asyncio.gather(*(follow(entry) for entry in started))

        stop_ms: list[float] = []

        async def stop(entry: dict[str, Any]) -> None:
            if entry.get("outcome") != "live":
                return
            t0 = time.perf_counter()
            response = await http.post(f"/v1/sessions/{entry['id']}/stop", json={"reason": "bench"})
            stop_ms.append((time.perf_counter() - t0) * 1000)
            entry["stop_http"] = response.status_code
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                status = (await http.get(f"/v1/sessions/{entry['id']}")).json()
                if status["phase"] in TERMINAL:
                    entry["final"] = status["phase"]
                    return
                await asyncio.sleep(POLL_S)
            entry["final"] = "unsettled"

        await asyncio.gather(*(stop(entry) for entry in started))
        metrics_text = (await http.get("/metrics", headers={"X-API-Key": deployment.admin_key})).text
    outcomes = Counter(entry["outcome"] for entry in started)
    start_ms = [entry["start_ms"] for entry in started]
    live_ms = [entry["live_ms"] for entry in started if "live_ms" in entry]
    return {
        "start_ms": start_ms,
        "start_wall_ms": start_wall_ms,
        "status_ms": status_ms,
        "stop_ms": stop_ms,
        "live_ms": live_ms,
        "outcomes": dict(outcomes),
        "finals": dict(
            Counter(entry.get("final", "-") for entry in started if entry.get("outcome") == "live")
        ),
        "http_codes": dict(Counter(str(entry["http"]) for entry in started)),
        "metrics_ok": "lipsync_sessions_ended_total" in metrics_text,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--sidecars", type=int, default=2)
    parser.add_argument("--slots", type=int, default=4, help="sessions per sidecar")
    parser.add_argument("--engine", choices=engine_choices(), default="preview")
    parser.add_argument(
        "--place-timeout-s", type=float, default=20.0, help="how long a session waits for a slot"
    )
    parser.add_argument("--settle-timeout-s", type=float, default=120.0)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--notes", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("httpx", "infra.process"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        work_dir = Path(tmp)
        deployment = Deployment(work_dir, args.sidecars, args.slots, args.engine, args.place_timeout_s)
        assets = work_dir / "assets"
        assets.mkdir()
        (assets / "astronaut.zip").write_bytes(avatar_zip_bytes())
        try:
            deployment.start()
            logger.info(
                "deployment ready: %d sidecars x %d slots; starting %d sessions",
                args.sidecars,
                args.slots,
                args.sessions,
            )
            with serve_directory(assets) as assets_url:
                raw = asyncio.run(
                    run_sessions(
                        deployment, args.sessions, args.settle_timeout_s, f"{assets_url}/astronaut.zip"
                    )
                )
        finally:
            deployment.stop()
    outcomes: dict[str, int] = raw["outcomes"]
    live = outcomes.get("live", 0)
    clear_failures = sum(
        count for outcome, count in outcomes.items() if outcome.startswith(("failed:", "http_"))
    )
    summary = {
        "sessions_requested": args.sessions,
        "sessions_started": raw["http_codes"].get("201", 0),
        "sessions_live": live,
        "sessions_failed_clearly": clear_failures,
        "sessions_unsettled": args.sessions - live - clear_failures,
        "capacity_slots": args.sidecars * args.slots,
        "start_p50_ms": _pct(raw["start_ms"], 50),
        "start_p99_ms": _pct(raw["start_ms"], 99),
        "start_max_ms": round(max(raw["start_ms"]), 1),
        "start_all_wall_ms": round(raw["start_wall_ms"], 1),
        "status_p50_ms": _pct(raw["status_ms"], 50),
        "status_p99_ms": _pct(raw["status_ms"], 99),
        "stop_p50_ms": _pct(raw["stop_ms"], 50),
        "stop_p99_ms": _pct(raw["stop_ms"], 99),
        "time_to_live_p50_ms": _pct(raw["live_ms"], 50),
        "time_to_live_p99_ms": _pct(raw["live_ms"], 99),
    }
    document = {
        "benchmark": "api",
        "device": cpu_name(),
        "torch": None,
        "settings": {
            "engine": args.engine,
            "sidecars": args.sidecars,
            "slots_per_sidecar": args.slots,
            "place_timeout_s": args.place_timeout_s,
            "output": "livekit (local livekit-server --dev)",
            "avatar": "astronaut 256x256, 8 frames (infra.demo)",
            "processes": "temporal dev server, livekit-server, nginx-rtmp, 1 worker, sidecars, 1 api",
            "notes": args.notes,
        },
        "summary": summary,
        "results": [
            {
                "sessions": args.sessions,
                "outcomes": outcomes,
                "after_stop": raw["finals"],
                "http_codes": raw["http_codes"],
                "metrics_endpoint_ok": raw["metrics_ok"],
            }
        ],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return 0 if summary["sessions_unsettled"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
