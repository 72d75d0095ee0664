"""While the SDK resumes a lost LiveKit connection, the publisher probes the server's address: refused means
the server is gone (`SERVER_UNREACHABLE`, so the session fails over without waiting out its output-down
timeout); a server that still takes connections may be resumed, so it is not flagged. Real TCP listeners on
loopback stand in for livekit-server's port (the probe opens a TCP connection and nothing more);
tests/workflows/test_livekit_failover.py covers the same against a real livekit-server that is SIGKILLed."""

from __future__ import annotations

import asyncio
import time

import pytest

from infra.process import free_port
from realtime.outputs.base import SERVER_UNREACHABLE
from realtime.outputs.livekit import LiveKitPublisher, LiveKitPublisherOptions, _server_address
from realtime.outputs.registry import LiveKitTarget


def publisher_for(port: int) -> LiveKitPublisher:
    target = LiveKitTarget(url=f"ws://127.0.0.1:{port}", room="r", identity="avatar", token="t")
    return LiveKitPublisher(target, LiveKitPublisherOptions(width_px=32, height_px=32))


def lose_connection(publisher: LiveKitPublisher) -> None:
    """What the SDK's `reconnecting` event does to the publisher of the room in use."""
    room = object()
    publisher._room = room  # type: ignore[assignment]  # the room in use, as after a join
    publisher._stats.connected = True
    publisher._on_transport_state(room, connected=False)  # type: ignore[arg-type]


class CountingListener:
    """A loopback TCP listener that accepts each connection, counts it and closes it: a server that is still
    there, as the probe sees it."""

    def __init__(self) -> None:
        self.accepted = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen on a free port; returns the port."""
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def _on_connect(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writer.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def until(predicate: object, timeout_s: float) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"condition not met in {timeout_s} s"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("ws://127.0.0.1:7880", ("127.0.0.1", 7880)),
        ("wss://lk.example.com", ("lk.example.com", 443)),
        ("ws://lk.example.com/", ("lk.example.com", 80)),
        ("https://lk.example.com:8443/path", ("lk.example.com", 8443)),
    ],
)
def test_the_probed_address_is_the_urls_host_and_port(url: str, address: tuple[str, int]) -> None:
    assert _server_address(url) == address


async def test_nothing_listening_at_the_servers_address_flags_it_unreachable() -> None:
    publisher = publisher_for(free_port())  # a port nobody listens on: connections are refused
    lose_connection(publisher)
    await until(lambda: publisher.stats().extra.get(SERVER_UNREACHABLE) == 1.0, 5.0)
    assert "refused a new connection" in publisher.stats().last_error
    # The SDK resumed after all: the flag goes with the outage.
    publisher._on_transport_state(publisher._room, connected=True)  # type: ignore[arg-type]
    assert SERVER_UNREACHABLE not in publisher.stats().extra
    await publisher.close()


async def test_a_server_still_listening_is_not_flagged_until_it_goes_away() -> None:
    listener = CountingListener()
    publisher = publisher_for(await listener.start())
    lose_connection(publisher)
    # Probed again and again while the publisher stays down, never flagged: the SDK may still resume.
    await until(lambda: listener.accepted >= 2, 5.0)
    assert SERVER_UNREACHABLE not in publisher.stats().extra
    await listener.close()
    await until(lambda: publisher.stats().extra.get(SERVER_UNREACHABLE) == 1.0, 5.0)
    await publisher.close()


async def test_the_probe_stops_once_the_publisher_is_connected_again() -> None:
    listener = CountingListener()
    try:
        publisher = publisher_for(await listener.start())
        lose_connection(publisher)
        await until(lambda: listener.accepted >= 1, 5.0)
        publisher._on_transport_state(publisher._room, connected=True)  # type: ignore[arg-type]
        await asyncio.sleep(0.6)  # two probe intervals and more
        probes = listener.accepted
        await asyncio.sleep(0.6)
        assert listener.accepted == probes, "the probe went on after the connection was resumed"
        await publisher.close()
    finally:
        await listener.close()
