"""Finding 5: bodies were parsed before the key was checked.

A real `lipsync api` process (connected to the real Temporal dev server). Four concurrent
unauthenticated 50 MB bodies get 401 as soon as their headers arrive, the process's peak RSS
(VmHWM, /proc) barely moves and `/healthz` keeps answering; with a key, a body over the route's
cap gets 413 (declared Content-Length, or chunked past the cap) before any JSON parsing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.limits import ROUTE_MAX_BODY_BYTES
from infra.paths import PROJECT_ROOT
from infra.process import free_port, log_tail
from infra.temporal import TemporalDevServerConfig
from tests.support.credentials import SIDECAR_SECRET

pytestmark = pytest.mark.service

KEY = "limits-key-0123456789"
ATTACK_BODY_BYTES = 50 * 1024 * 1024
CHUNK_BYTES = 256 * 1024
# What four 50 MB bodies may add to the API's peak RSS at most (they used to add ~540 MiB).
PEAK_RSS_GROWTH_BOUND_MIB = 40.0


def rss_mib(pid: int, field: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.fixture
def api_process(temporal_dev_server: TemporalDevServerConfig, tmp_path: Path) -> Iterator[tuple[int, int]]:
    port = free_port()
    log_path = tmp_path / "api.log"
    env = {
        **os.environ,
        "LIPSYNC_API_KEYS": KEY,
        "LIVEKIT_API_SECRET": "x" * 32,
        "TEMPORAL_ADDRESS": temporal_dev_server.target,
        "LIPSYNC_SIDECAR_SECRET": SIDECAR_SECRET,
        "LIPSYNC_TRACE_EXPORTER": "none",
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "api", "--port", str(port)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None, log_tail(log_path)
                with contextlib.suppress(httpx.HTTPError):
                    if (
                        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2, trust_env=False).status_code
                        == 200
                    ):
                        break
                assert time.monotonic() < deadline, log_tail(log_path)
                time.sleep(0.2)
            yield process.pid, port
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


async def raw_post(
    port: int, path: str, headers: dict[str, str], body_bytes: int, *, chunked: bool = False
) -> int:
    """POST `body_bytes` of zeros while reading the answer at the same time (a server that answers early and
    closes must not lose its answer to our still-running upload). Returns the HTTP status.

    A plain socket rather than asyncio streams: when the server has closed, our next write fails, and a
    stream transport then closes itself and drops the answer it had not read yet; a socket keeps reading."""
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)

    async def status_line() -> bytes:
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while b"\r\n" not in received:
                chunk = await loop.sock_recv(sock, 4096)
                if not chunk:
                    break
                received += chunk
        return received.split(b"\r\n", 1)[0]

    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {body_bytes}")
    reading = asyncio.create_task(status_line())
    try:
        await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
        sent = 0
        while sent < body_bytes and not reading.done():
            size = min(CHUNK_BYTES, body_bytes - sent)
            chunk = b"0" * size
            await loop.sock_sendall(sock, f"{size:x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk)
            sent += size
        if chunked and not reading.done():
            await loop.sock_sendall(sock, b"0\r\n\r\n")
    except (ConnectionResetError, BrokenPipeError):
        pass
    try:
        line = await asyncio.wait_for(reading, 30)
    finally:
        sock.close()
    assert line.startswith(b"HTTP/1.1 "), line
    return int(line.split()[1])


async def test_unauthenticated_bodies_are_refused_before_they_are_read(api_process: tuple[int, int]) -> None:
    pid, port = api_process
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as client:
        for _ in range(3):  # warm the paths the attack takes
            await client.post("/v1/sessions", json={})
        idle_peak = rss_mib(pid)
        healthz_s: list[float] = []

        async def probe() -> None:
            while True:
                started = time.monotonic()
                assert (await client.get("/healthz")).status_code == 200
                healthz_s.append(time.monotonic() - started)
                await asyncio.sleep(0.05)

        prober = asyncio.create_task(probe())
        started = time.monotonic()
        statuses = await asyncio.gather(
            *(raw_post(port, "/v1/sessions", {}, ATTACK_BODY_BYTES) for _ in range(2)),
            *(
                raw_post(port, "/v1/livekit/token", {"X-API-Key": "wrong"}, ATTACK_BODY_BYTES)
                for _ in range(2)
            ),
        )
        attack_s = time.monotonic() - started
        prober.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await prober
        growth = rss_mib(pid) - idle_peak
    assert statuses == [401, 401, 401, 401]
    assert growth < PEAK_RSS_GROWTH_BOUND_MIB, (
        f"peak RSS grew {growth:.1f} MiB (idle peak {idle_peak:.1f} MiB)"
    )
    assert attack_s < 10, attack_s  # answered on the headers, not after 200 MB were uploaded and parsed
    assert healthz_s and max(healthz_s) < 1.0, healthz_s


async def test_a_keyed_body_over_the_route_cap_is_413_before_parsing(api_process: tuple[int, int]) -> None:
    _, port = api_process
    cap = ROUTE_MAX_BODY_BYTES["/v1/sessions"]
    auth = {"X-API-Key": KEY}
    assert await raw_post(port, "/v1/sessions", auth, cap + 1) == 413
    assert await raw_post(port, "/v1/sessions", auth, 4 * cap, chunked=True) == 413
    assert await raw_post(port, "/v1/livekit/token", auth, 1024 * 1024) == 413  # smaller cap elsewhere
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as client:
        too_large = await client.post("/v1/sessions", content=b"{" + b" " * cap + b"}", headers=auth)
        assert too_large.status_code == 413 and too_large.json()["code"] == "body_too_large"
        # Under the cap, the body reaches validation as before (a 422 naming the fields).
        invalid = await client.post("/v1/sessions", json={"avatar": {}}, headers=auth)
        assert invalid.status_code == 422 and invalid.json()["code"] == "validation_error"
