"""Per-packet audio timing on loopback: where a subscriber's audio delay comes from.

    python -m bench.rtp_timing --out rtp.tsv --seconds 300      # capture (needs CAP_NET_RAW: root)

A subscriber's audio jitter buffer (NetEq) grows when packets reach it later than their RTP timestamps
say they should. On a local deployment every packet crosses loopback twice, publisher -> livekit-server
and livekit-server -> subscriber, and the kernel timestamps each crossing when the sending process hands
it over. SRTP encrypts only the payload, so the RTP header (SSRC, sequence number, timestamp) is readable
on both legs. That splits the delay a subscriber sees into:

- `send_jitter_ms`: how late the publisher (the sidecar) sent each audio packet relative to its RTP
  timestamp, against the earliest packet of the two seconds before it (a sender that paces on time reads
  ≈ 0; a starved pacing or network thread sends late or in bursts);
- `forward_delay_ms`: from the publisher's packet on loopback to livekit-server's copy of it to the
  subscriber (a starved server delays it);
- the rest is the subscriber's own (its receive thread and jitter buffer: its WebRTC stats).

`video_send_jitter_ms` is the same lateness for the first packet of each video frame against its
capture timestamp (the 90 kHz RTP clock, 3600 ticks a frame at 25 fps): how much encoding and pacing
on a starved host delay frames, which a receiver's video jitter buffer then absorbs.

Audio flows are told from video by their RTP clock (a 20 ms Opus packet advances it 960 at 48 kHz); the
publisher's flow is the one sent to the server's UDP port, the subscriber's the one sent from it.
Linux only (AF_PACKET, SO_TIMESTAMPNS); timestamps are CLOCK_REALTIME.
"""

from __future__ import annotations

import argparse
import logging
import socket
import struct
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("bench.rtp_timing")

_ETH_P_ALL = 0x0003
_SO_TIMESTAMPNS = 35  # linux/asm-generic/socket.h; the control message has the same number
_PACKET_OUTGOING = 4  # each loopback packet is seen twice (out and in): the outgoing copy is kept
_ETHERNET_HEADER_BYTES = 14
OPUS_PACKET_TICKS = 960  # a 20 ms Opus packet at the 48 kHz RTP clock
RTP_CLOCK_HZ = 48_000
VIDEO_CLOCK_HZ = 90_000
VIDEO_FRAME_TICKS = VIDEO_CLOCK_HZ // 25  # 25 fps
# The reference a packet's lateness is measured against: the earliest transit of the packets this long
# before it (real-time pacing reaches it within a packet or two).
BASELINE_WINDOW_S = 2.0
# A packet on the server's leg is the publisher's when it left at most this long after it (else unmatched).
MAX_FORWARD_S = 2.0


@dataclass(frozen=True)
class RtpPacket:
    at_s: float  # kernel timestamp, CLOCK_REALTIME seconds
    src_port: int
    dst_port: int
    ssrc: int
    payload_type: int
    sequence: int
    rtp_timestamp: int


def parse_rtp(frame: bytes) -> tuple[int, int, int, int, int, int] | None:
    """(source port, destination port, SSRC, payload type, sequence, RTP timestamp) of an IPv4/UDP frame on
    loopback that carries RTP (version 2, not RTCP), else None."""
    ip = frame[_ETHERNET_HEADER_BYTES:]
    if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_UDP:
        return None
    header = (ip[0] & 0x0F) * 4
    source, destination = struct.unpack("!HH", ip[header : header + 4])
    rtp = ip[header + 8 :]
    # RTCP shares the port (rtcp-mux): its packet types 192-223 sit where RTP's marker + payload type are.
    if len(rtp) < 12 or rtp[0] >> 6 != 2 or 192 <= rtp[1] <= 223:
        return None
    sequence, timestamp, ssrc = struct.unpack("!HII", rtp[2:12])
    return source, destination, ssrc, rtp[1] & 0x7F, sequence, timestamp


def capture(out: Path, seconds: float) -> int:
    """Write one line per RTP packet on loopback (kernel time, ports, SSRC, payload type, sequence, RTP
    timestamp) to `out` for `seconds`; returns the number of packets."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    sock.bind(("lo", 0))
    sock.settimeout(0.5)
    packets = 0
    end_s = time.monotonic() + seconds
    with out.open("w") as sink:
        while time.monotonic() < end_s:
            try:
                frame, ancillary, _flags, address = sock.recvmsg(65_536, 64)
            except TimeoutError:
                continue
            if address[2] != _PACKET_OUTGOING:
                continue
            parsed = parse_rtp(frame)
            if parsed is None:
                continue
            at_s = time.time()
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                    seconds_part, nanoseconds = struct.unpack("qq", data[:16])
                    at_s = seconds_part + nanoseconds / 1e9
            sink.write(f"{at_s:.6f}\t" + "\t".join(str(value) for value in parsed) + "\n")
            packets += 1
    sock.close()
    return packets


def read_capture(path: Path) -> list[RtpPacket]:
    packets = []
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) != 7:
            continue  # a line cut short when the capture was stopped
        packets.append(RtpPacket(float(fields[0]), *(int(value) for value in fields[1:])))
    return packets


def _flows(
    packets: list[RtpPacket], server_port: int, step_ticks: int
) -> tuple[list[RtpPacket], list[RtpPacket]]:
    """(publisher -> server, server -> subscriber) packets: the largest flow of each direction whose RTP clock
    most often steps `step_ticks` from one packet (audio) or frame (video: a frame's packets share one
    timestamp, so the steps that are not 0) to the next."""
    flows: dict[tuple[int, bool], list[RtpPacket]] = defaultdict(list)
    for packet in packets:
        if packet.dst_port == server_port:
            flows[(packet.ssrc, True)].append(packet)
        elif packet.src_port == server_port:
            flows[(packet.ssrc, False)].append(packet)
    best: dict[bool, list[RtpPacket]] = {True: [], False: []}
    for (_ssrc, upward), flow in flows.items():
        steps = np.diff([packet.rtp_timestamp for packet in flow]) % (1 << 32)
        steps = steps[steps != 0]
        if len(steps) and np.median(steps) == step_ticks and len(flow) > len(best[upward]):
            best[upward] = flow
    return best[True], best[False]


def publisher_audio(packets: list[RtpPacket], server_port: int) -> list[RtpPacket]:
    """The publisher's audio packets to the server (see `_flows`)."""
    return _flows(packets, server_port, OPUS_PACKET_TICKS)[0]


def _media_times_s(flow: list[RtpPacket], clock_hz: int = RTP_CLOCK_HZ) -> np.ndarray:
    timestamps = np.array([p.rtp_timestamp for p in flow], dtype=np.float64)
    return np.asarray(np.unwrap(timestamps, period=2.0**32) / clock_hz)


def first_of_each_frame(flow: list[RtpPacket]) -> list[RtpPacket]:
    """A video flow's first packet of each frame (its packets share the frame's RTP timestamp)."""
    return [
        packet
        for index, packet in enumerate(flow)
        if not index or packet.rtp_timestamp != flow[index - 1].rtp_timestamp
    ]


def send_lateness_ms(flow: list[RtpPacket], clock_hz: int = RTP_CLOCK_HZ) -> np.ndarray:
    """Per packet: its transit (sent − RTP time) less the least transit of the `BASELINE_WINDOW_S` before."""
    if not flow:
        return np.zeros(0)
    at_s = np.array([p.at_s for p in flow])
    transit_s = at_s - _media_times_s(flow, clock_hz)
    lateness = np.empty(len(flow))
    start = 0
    for index in range(len(flow)):
        while at_s[start] < at_s[index] - BASELINE_WINDOW_S:
            start += 1
        lateness[index] = transit_s[index] - transit_s[start : index + 1].min()
    return lateness * 1000.0


def forward_delays_ms(upward: list[RtpPacket], downward: list[RtpPacket]) -> tuple[np.ndarray, np.ndarray]:
    """(when the server sent it on, CLOCK_REALTIME s; that less when the publisher sent it, ms) per
    forwarded packet. The server rewrites SSRC, sequence and timestamp by constant offsets per track: the
    timestamp offset is the one most nearest-in-time pairs agree on."""
    if not upward or not downward:
        return np.zeros(0), np.zeros(0)
    up_at = np.array([p.at_s for p in upward])
    up_ticks = np.round(_media_times_s(upward) * RTP_CLOCK_HZ).astype(np.int64)
    down_at = np.array([p.at_s for p in downward])
    down_ticks = np.round(_media_times_s(downward) * RTP_CLOCK_HZ).astype(np.int64)
    nearest = np.searchsorted(up_at, down_at) - 1
    valid = nearest >= 0
    if not valid.any():
        return np.zeros(0), np.zeros(0)
    offset = Counter((down_ticks[valid] - up_ticks[nearest[valid]]).tolist()).most_common(1)[0][0]
    sent_at = dict(zip(up_ticks.tolist(), up_at.tolist(), strict=True))
    pairs = [
        (at, at - sent_at[ticks - offset])
        for at, ticks in zip(down_at.tolist(), down_ticks.tolist(), strict=True)
        if ticks - offset in sent_at and 0.0 <= at - sent_at[ticks - offset] <= MAX_FORWARD_S
    ]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    times, delays = zip(*pairs, strict=True)
    return np.array(times), np.array(delays) * 1000.0


def _percentiles(values: np.ndarray) -> dict[str, float | None]:
    if not len(values):
        return {"p50": None, "p90": None, "p99": None, "max": None}
    return {
        "p50": round(float(np.percentile(values, 50)), 2),
        "p90": round(float(np.percentile(values, 90)), 2),
        "p99": round(float(np.percentile(values, 99)), 2),
        "max": round(float(values.max()), 2),
    }


def summarise(
    packets: list[RtpPacket], server_port: int, windows: dict[str, tuple[float, float]]
) -> dict[str, dict[str, Any]]:
    """Per named window (CLOCK_REALTIME start, end): the publisher's audio send lateness and the server's
    forward delay, as percentiles (ms), and how many packets each leg had."""
    upward, downward = _flows(packets, server_port, OPUS_PACKET_TICKS)
    lateness = send_lateness_ms(upward)
    video = first_of_each_frame(_flows(packets, server_port, VIDEO_FRAME_TICKS)[0])
    video_lateness = send_lateness_ms(video, VIDEO_CLOCK_HZ)
    video_at = np.array([p.at_s for p in video])
    forward_at, forward = forward_delays_ms(upward, downward)
    up_at = np.array([p.at_s for p in upward])
    result: dict[str, dict[str, Any]] = {}
    for name, (start_s, end_s) in windows.items():
        in_up = (up_at >= start_s) & (up_at <= end_s) if len(up_at) else np.zeros(0, dtype=bool)
        in_down = (forward_at >= start_s) & (forward_at <= end_s) if len(forward_at) else np.zeros(0, bool)
        result[name] = {
            "audio_packets_sent": int(in_up.sum()),
            "send_jitter_ms": _percentiles(lateness[in_up] if len(lateness) else lateness),
            "audio_packets_forwarded": int(in_down.sum()),
            "forward_delay_ms": _percentiles(forward[in_down] if len(forward) else forward),
            # The first packet of each video frame vs its capture timestamp: encoding and pacing delay.
            "video_send_jitter_ms": _percentiles(
                video_lateness[(video_at >= start_s) & (video_at <= end_s)] if len(video) else video_lateness
            ),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rtp_timing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        packets = capture(args.out, args.seconds)
    except PermissionError:
        logger.error("capturing on loopback needs CAP_NET_RAW (run as root)")
        return 2
    logger.info("captured %d RTP packets", packets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
