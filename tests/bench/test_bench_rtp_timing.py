"""bench.rtp_timing: RTP headers read from loopback frames, and the send and forward timing from them."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from bench import rtp_timing
from bench.rtp_timing import RtpPacket

SERVER_PORT = 7882
PUBLISHER_PORT = 40_000
SUBSCRIBER_PORT = 40_001


def udp_frame(source: int, destination: int, payload: bytes) -> bytes:
    """An Ethernet (loopback) + IPv4 + UDP frame carrying `payload`."""
    udp = struct.pack("!HHHH", source, destination, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0, bytes(4), bytes(4)
    )
    return bytes(14) + ip + udp


def rtp(payload_type: int, sequence: int, timestamp: int, ssrc: int) -> bytes:
    return struct.pack("!BBHII", 0x80, payload_type, sequence, timestamp, ssrc) + bytes(40)


def test_rtp_headers_are_read_and_rtcp_and_other_traffic_is_not() -> None:
    assert rtp_timing.parse_rtp(udp_frame(PUBLISHER_PORT, SERVER_PORT, rtp(111, 7, 960, 42))) == (
        PUBLISHER_PORT,
        SERVER_PORT,
        42,
        111,
        7,
        960,
    )
    sender_report = struct.pack("!BBH", 0x80, 200, 6) + bytes(24)  # RTCP SR on the same port (rtcp-mux)
    assert rtp_timing.parse_rtp(udp_frame(SUBSCRIBER_PORT, SERVER_PORT, sender_report)) is None
    assert (
        rtp_timing.parse_rtp(udp_frame(PUBLISHER_PORT, SERVER_PORT, b"\x00\x01" + bytes(18))) is None
    )  # STUN
    assert rtp_timing.parse_rtp(bytes(14) + b"\x60" + bytes(60)) is None  # IPv6


def audio(at_s: list[float], *, upward: bool, ssrc: int, offset_ticks: int = 0) -> list[RtpPacket]:
    """Audio packets, 20 ms of RTP time apart, sent at the given times."""
    ports = (PUBLISHER_PORT, SERVER_PORT) if upward else (SERVER_PORT, SUBSCRIBER_PORT)
    return [
        RtpPacket(at, *ports, ssrc, 111, index, offset_ticks + index * rtp_timing.OPUS_PACKET_TICKS)
        for index, at in enumerate(at_s)
    ]


def test_a_burst_after_a_stall_reads_as_late_packets_and_the_forward_delay_is_matched() -> None:
    # 50 packets on time, then a 200 ms stop: the next 10 packets leave together at its end.
    sent = [1000.0 + 0.02 * index for index in range(50)] + [1000.0 + 0.02 * 59] * 10
    sent += [1000.0 + 0.02 * index for index in range(60, 80)]
    lateness = rtp_timing.send_lateness_ms(audio(sent, upward=True, ssrc=1))
    assert max(lateness[:50]) < 1e-6 and max(lateness[60:]) < 1e-6
    assert lateness[50] == pytest.approx(180.0) and lateness[59] == pytest.approx(0.0, abs=1e-6)
    # The server rewrites the timestamps by a constant and forwards each packet 3 ms later.
    forwarded = audio([at + 0.003 for at in sent], upward=False, ssrc=2, offset_ticks=123_456)
    times, delays = rtp_timing.forward_delays_ms(audio(sent, upward=True, ssrc=1), forwarded)
    assert len(delays) == len(sent) and delays == pytest.approx([3.0] * len(sent))
    assert times[0] == pytest.approx(1000.003)


def test_summary_per_window_and_video_frames(tmp_path: Path) -> None:
    sent = [1000.0 + 0.02 * index for index in range(100)]
    video = [
        RtpPacket(1000.0 + 0.04 * frame + (0.01 if frame == 10 else 0.0), PUBLISHER_PORT, SERVER_PORT, 3, 96,
                  frame * 2 + part, frame * rtp_timing.VIDEO_FRAME_TICKS)
        for frame in range(50)
        for part in range(2)
    ]  # fmt: skip
    packets = [
        *audio(sent, upward=True, ssrc=1),
        *audio([at + 0.001 for at in sent], upward=False, ssrc=2),
        *video,
    ]
    path = tmp_path / "rtp.tsv"
    path.write_text(
        "".join(
            f"{p.at_s:.6f}\t{p.src_port}\t{p.dst_port}\t{p.ssrc}\t{p.payload_type}\t{p.sequence}\t"
            f"{p.rtp_timestamp}\n"
            for p in packets
        )
        + "1000.5\t1\t2"  # a line cut short when the capture stopped
    )
    summary = rtp_timing.summarise(
        rtp_timing.read_capture(path), SERVER_PORT, {"first": (1000.0, 1000.99), "second": (1001.0, 1003.0)}
    )
    assert summary["first"]["audio_packets_sent"] == 50 and summary["second"]["audio_packets_sent"] == 50
    assert summary["first"]["forward_delay_ms"] == {"p50": 1.0, "p90": 1.0, "p99": 1.0, "max": 1.0}
    assert summary["first"]["video_send_jitter_ms"]["max"] == pytest.approx(10.0)  # frame 10, 10 ms late
    assert summary["second"]["video_send_jitter_ms"]["max"] == pytest.approx(0.0, abs=1e-3)
