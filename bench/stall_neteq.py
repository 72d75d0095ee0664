"""Stall bench: what a subscriber's audio jitter buffer (NetEq) does when the sidecar is stopped in speech.

    python -m bench.stall_neteq --json bench/results/stall-neteq-cpu-<yyyymmdd>.json \
        [--cpu-hog --sidecar-nice -5]

Root: it captures RTP headers on loopback (bench/rtp_timing.py). The deployment is bench.sync's (`split`
placement: the sidecar, and the hog with `--cpu-hog`, on core 0; livekit-server and the subscriber, this
process, on core 1). The sidecar is SIGSTOPped (`--stall-ms`) in the middle of an utterance twice: once
while the subscriber's audio stream is young (a few seconds after it subscribed) and once when it is older
than `--mature-after-s` (clean utterances fill the time in between); `--after` utterances follow each
stall. Then `--idle-stalls` times in silence, `IDLE_STALL_AFTER_S` after an utterance, each followed by one
utterance (whether such a stall holds up Opus' DTX refresh, two packets every 400 ms of silence, is
chance). Per stall the result has:

- `burst`: the sidecar's audio packets that left within `BURST_WINDOW_MS` of the resume more than
  `LATE_MS` late against their RTP timestamps (kernel timestamps on loopback): how many, how late, and
  how far apart they left.
  The SDK's audio pacer (libwebrtc's repeating task) catches up on the pulls the stop held up back to back,
  so the whole stall's audio leaves at once, its RTP timestamps counting on from before the stop;
- `neteq`: the subscriber's audio receive statistics read every `STATS_INTERVAL_S`, per interval: the
  mean delay of the audio it played (jitterBufferDelay), its mean target delay (jitterBufferTargetDelay),
  concealed and accelerated (removed) samples, from 1 s before the stop to `--trace-s` after the resume;
  and how long after the resume the delay and the target stayed more than `RISE_MS` above their level
  before the stop (`delay_held_s`, `target_held_s`);
- `utterances`: the subscriber's A/V offset (median over the frames, docs/audio-protocol.md §4.1) and its
  jitter buffers for the stalled utterance and the ones after it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import websockets

from bench import rtp_timing
from bench import sync as bench_sync
from bench.machine import cpu_name
from infra import livekit
from infra.demo import avatar_zip_bytes
from infra.process import pin_threads

logger = logging.getLogger("bench.stall_neteq")

STATS_INTERVAL_S = 0.1
BURST_WINDOW_MS = 50.0  # late packets that left this soon after the resume are the stall's catch-up
LATE_MS = 5.0  # later than a packet's send jitter on a quiet core (bench/rtp_timing.py: p99 under 1 ms)
RISE_MS = 20.0  # a delay this far above its level before the stop counts as raised by the stall
TRACE_BEFORE_S = 1.0
IDLE_STALL_AFTER_S = 0.5  # a stall in silence comes this long after an utterance's playback_finished


class ReceiveReading(Protocol):
    """One reading of a subscriber's receive statistics (tests/support/avcheck.JitterSample)."""

    @property
    def at_s(self) -> float: ...
    @property
    def kind(self) -> str: ...
    @property
    def jitter_buffer_delay_s(self) -> float: ...
    @property
    def jitter_buffer_target_delay_s(self) -> float: ...
    @property
    def emitted(self) -> int: ...
    @property
    def concealed_samples(self) -> int: ...
    @property
    def removed_for_acceleration(self) -> int: ...


@dataclass(frozen=True)
class NetEqInterval:
    """The subscriber's audio jitter buffer between two readings of its receive statistics."""

    at_s: float  # the later reading (time.monotonic())
    delay_ms: float  # mean delay of the samples it played in the interval
    target_ms: float  # mean target delay over them
    concealed_samples: int
    accelerated_samples: int  # removed to shorten the buffer


def neteq_intervals(samples: Sequence[ReceiveReading], kind: str = "audio") -> list[NetEqInterval]:
    """Per pair of consecutive readings of `kind` in which the buffer
    played something: its interval figures."""
    rows = [sample for sample in samples if sample.kind == kind]
    intervals = []
    for previous, current in itertools.pairwise(rows):
        emitted = current.emitted - previous.emitted
        if emitted <= 0:
            continue
        intervals.append(
            NetEqInterval(
                at_s=current.at_s,
                delay_ms=1000.0 * (current.jitter_buffer_delay_s - previous.jitter_buffer_delay_s) / emitted,
                target_ms=1000.0
                * (current.jitter_buffer_target_delay_s - previous.jitter_buffer_target_delay_s)
                / emitted,
                concealed_samples=current.concealed_samples - previous.concealed_samples,
                accelerated_samples=current.removed_for_acceleration - previous.removed_for_acceleration,
            )
        )
    return intervals


def held_s(
    intervals: list[NetEqInterval],
    value: Callable[[NetEqInterval], float],
    stopped_at_s: float,
    resumed_at_s: float,
    until_s: float,
) -> tuple[float, float, float]:
    """(level before the stop, highest after the resume, seconds after the resume until the value was last
    more than `RISE_MS` above that level) for one figure of the intervals; 0 s when it never rose. The
    level is the median over the `TRACE_BEFORE_S` before the stop."""
    before = [value(row) for row in intervals if stopped_at_s - TRACE_BEFORE_S <= row.at_s < stopped_at_s]
    after = [row for row in intervals if resumed_at_s <= row.at_s <= until_s]
    if not before or not after:
        raise ValueError("no receive statistics around the stall: was the subscriber reading them?")
    level = float(np.median(before))
    raised = [row.at_s for row in after if value(row) > level + RISE_MS]
    highest = max(value(row) for row in after)
    return level, highest, (max(raised) - resumed_at_s) if raised else 0.0


def burst(lateness_ms: np.ndarray, sent_at_s: np.ndarray, resumed_at_s: float) -> dict[str, Any]:
    """The publisher's audio packets sent within `BURST_WINDOW_MS` after the resume (times on one clock)
    later than `LATE_MS` against their RTP timestamps: how many, how late, when the first left after the
    resume and how far apart the first and the last left."""
    window = (
        (sent_at_s >= resumed_at_s)
        & (sent_at_s <= resumed_at_s + BURST_WINDOW_MS / 1000.0)
        & (lateness_ms > LATE_MS)
    )
    if not window.any():
        return {"packets": 0}
    at_s, late_ms = sent_at_s[window], lateness_ms[window]
    return {
        "packets": int(window.sum()),
        "lateness_ms_max": round(float(late_ms.max()), 1),
        "lateness_ms_min": round(float(late_ms.min()), 1),
        "first_after_resume_ms": round(float(at_s.min() - resumed_at_s) * 1000.0, 2),
        "spread_ms": round(float(at_s.max() - at_s.min()) * 1000.0, 2),
    }


@dataclass
class Stall:
    label: str
    in_speech: bool = True
    stopped_at_s: float = 0.0
    resumed_at_s: float = 0.0


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    from tests.support.avcheck import (  # noqa: PLC0415 (tests/ is not installed with the package)
        RoomRecorder,
    )
    from tests.support.credentials import (  # noqa: PLC0415 (tests/ is not installed with the package)
        audio_token,
    )

    pin_threads(os.getpid(), {bench_sync.PEERS_CORE})
    config = livekit.LiveKitServerConfig().with_free_ports()
    server = livekit.server_process(config, work_dir / "livekit")
    server.start()
    if server.pid is not None:
        pin_threads(server.pid, {bench_sync.PEERS_CORE})
    capture_path = work_dir / "rtp.tsv"
    capture = subprocess.Popen(  # noqa: ASYNC220 (started once, before the run)
        [sys.executable, "-m", "bench.rtp_timing", "--out", str(capture_path), "--seconds", "3600"]
    )
    sidecar = bench_sync.Sidecar(work_dir, config.ws_url, pinned=True, nice=args.sidecar_nice)
    hog = bench_sync.start_hog(args.hog_nice) if args.cpu_hog else None
    clips = [bench_sync.espeak(work_dir, index, text) for index, text in enumerate(bench_sync.SENTENCES)]
    avatar = work_dir / "astronaut.zip"
    avatar.write_bytes(avatar_zip_bytes())
    recorder = RoomRecorder(mouth_box=(0, 0, 8, 8), stats_interval_s=STATS_INTERVAL_S)
    stalls = [Stall("young"), Stall("mature")]
    stalls += [Stall(f"idle{index}", in_speech=False) for index in range(args.idle_stalls)]
    spoken: list[tuple[str, bench_sync.Spoken]] = []
    try:
        await sidecar.wait_ready()
        session_id = "bench-stall"
        await bench_sync.start_watched_session(sidecar, config, avatar, session_id, recorder)
        subscribed_at_s = time.monotonic()
        pin_threads(os.getpid(), {bench_sync.PEERS_CORE})  # the SDK's threads, whichever thread started them
        url = (
            f"ws://127.0.0.1:{sidecar.port}/v1/sessions/{session_id}/audio?sample_rate={clips[0].rate_hz}"
            f"&token={audio_token(session_id)}"
        )

        def stop(stall: Stall) -> Callable[[], None]:
            def stop_now() -> None:
                stall.stopped_at_s = time.monotonic()
                sidecar.stall(args.stall_ms / 1000.0)
                stall.resumed_at_s = time.monotonic()

            return stop_now

        async with websockets.connect(url) as ws:
            await bench_sync.next_of(ws, "ready")

            async def say(index: int, label: str, stall: Stall | None = None) -> None:
                clip = clips[index % len(clips)]
                spoken.append((label, await bench_sync.speak(ws, clip, stall=stop(stall) if stall else None)))
                await asyncio.sleep(0.3)

            await say(3, "before")
            for number, stall in enumerate(stalls):
                index = 0
                while stall.label == "mature" and time.monotonic() - subscribed_at_s < args.mature_after_s:
                    await say(index, "filler")
                    index += 1
                if stall.in_speech:
                    await say(0, f"{stall.label} stalled", stall)
                    for after in range(args.after):
                        await say(after + 1, f"{stall.label} after {after + 1}")
                    continue
                # In silence, `IDLE_STALL_AFTER_S` after an utterance (Opus is in DTX by then).
                await say(number, f"{stall.label} before")
                await asyncio.sleep(IDLE_STALL_AFTER_S - 0.3)
                await asyncio.to_thread(stop(stall))
                await asyncio.sleep(IDLE_STALL_AFTER_S)
                await say(number + 1, f"{stall.label} after 1")
            await asyncio.sleep(1.0)
    finally:
        await recorder.close()
        if hog is not None:
            hog.kill()
            hog.wait(timeout=5)
        capture.terminate()
        capture.wait(timeout=10)
        sidecar.stop()
        server.stop()

    to_monotonic_s = time.monotonic() - time.time()  # the capture's CLOCK_REALTIME onto time.monotonic()
    upward = rtp_timing.publisher_audio(rtp_timing.read_capture(capture_path), config.rtc_udp_port)
    lateness_ms = rtp_timing.send_lateness_ms(upward)
    sent_at_s = np.array([packet.at_s for packet in upward]) + to_monotonic_s
    intervals = neteq_intervals(recorder.jitter)
    episodes = []
    for number, stall in enumerate(stalls):
        until_s = stall.resumed_at_s + args.trace_s
        if number + 1 < len(stalls):  # not into the next stall's
            until_s = min(until_s, stalls[number + 1].stopped_at_s - TRACE_BEFORE_S)
        delay = held_s(intervals, lambda row: row.delay_ms, stall.stopped_at_s, stall.resumed_at_s, until_s)
        target = held_s(intervals, lambda row: row.target_ms, stall.stopped_at_s, stall.resumed_at_s, until_s)
        rows = [
            {"label": label, **bench_sync.measure(recorder, utterance)}
            for label, utterance in spoken
            if label.startswith(f"{stall.label} ")
        ]
        episodes.append(
            {
                "stall": stall.label,
                "in_speech": stall.in_speech,
                "subscribed_for_s": round(stall.stopped_at_s - subscribed_at_s, 1),
                "burst": burst(lateness_ms, sent_at_s, stall.resumed_at_s),
                "delay_ms_before": round(delay[0], 1),
                "delay_ms_max_after": round(delay[1], 1),
                "delay_held_s": round(delay[2], 2),
                "target_ms_before": round(target[0], 1),
                "target_ms_max_after": round(target[1], 1),
                "target_held_s": round(target[2], 2),
                "utterances": rows,
                "neteq": [
                    {
                        "t_s": round(row.at_s - stall.resumed_at_s, 2),
                        "delay_ms": round(row.delay_ms, 1),
                        "target_ms": round(row.target_ms, 1),
                        "concealed_samples": row.concealed_samples,
                        "accelerated_samples": row.accelerated_samples,
                    }
                    for row in intervals
                    if stall.stopped_at_s - TRACE_BEFORE_S <= row.at_s <= until_s
                ],
            }
        )
    return {"episodes": episodes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stall_neteq", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stall-ms", type=float, default=250.0)
    parser.add_argument(
        "--mature-after-s",
        type=float,
        default=45.0,
        help="the second stall comes once the subscriber has received the audio this long",
    )
    parser.add_argument("--after", type=int, default=3, help="utterances measured after each stall")
    parser.add_argument("--trace-s", type=float, default=8.0, help="NetEq trace after each resume")
    parser.add_argument(
        "--idle-stalls", type=int, default=4, help="stalls in silence after the mature one (each measured)"
    )
    parser.add_argument("--cpu-hog", action="store_true", help="a process spinning on the sidecar's core")
    parser.add_argument(
        "--sidecar-nice", type=int, default=0, help="the sidecar's nice value (below 0: root)"
    )
    parser.add_argument("--hog-nice", type=int, default=0, help="the hog's nice value (0..19)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--notes", default="")
    args = parser.parse_args(argv)
    if args.after < 1 or args.trace_s <= 0 or args.stall_ms <= 0 or args.idle_stalls < 0:
        parser.error(
            "--after must be at least 1, --idle-stalls at least 0, --trace-s and --stall-ms positive"
        )
    if os.geteuid() != 0:
        parser.error("capturing RTP on loopback needs root (CAP_NET_RAW)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("httpx", "infra.process", "livekit"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-stall-") as tmp:
        raw = asyncio.run(run(args, Path(tmp)))
    document = {
        "benchmark": "stall_neteq",
        "device": f"cpu: {cpu_name()}, {os.cpu_count()} cores",
        "settings": {
            "stall": f"SIGSTOP of the sidecar process, {args.stall_ms:.0f} ms, in the middle of an utterance",
            "subscriber": "livekit.rtc in the bench process (native SDK: libwebrtc's NetEq)",
            "placement": "split",
            "cpu_hog": args.cpu_hog,
            "sidecar_nice": args.sidecar_nice,
            "hog_nice": args.hog_nice,
            "mature_after_s": args.mature_after_s,
            "load_average_before": [round(value, 2) for value in load_before],
            "load_average_after": [round(value, 2) for value in os.getloadavg()],
            "notes": args.notes,
        },
        "episodes": raw["episodes"],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=1) + "\n")
    summary = [
        {key: value for key, value in episode.items() if key not in ("neteq", "utterances")}
        | {"offsets_ms": [row.get("median_ms") for row in episode["utterances"]]}
        for episode in raw["episodes"]
    ]
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
