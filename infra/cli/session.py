"""`lipsync session start|status|stop|stream`: operate sessions through a running API with `lipsync_client`.

Every command prints JSON on stdout (one object; `stream` prints one line per server event)
and exits 0, or prints `error: <code>: <message>` on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import wave
from pathlib import Path
from typing import Any

DEFAULT_API_URL = "http://127.0.0.1:8000"
READY_TIMEOUT_S = 120.0
FINISH_TIMEOUT_S = 30.0  # after the last audio: the tail, lookahead padding and the publish queue


def register(subparsers: Any) -> None:
    session = subparsers.add_parser(
        "session", help="start, inspect, stop sessions and stream a WAV through the API"
    )
    session.add_argument(
        "--api-url",
        default=os.environ.get("LIPSYNC_API_URL", DEFAULT_API_URL),
        help=f"the API (env LIPSYNC_API_URL, default {DEFAULT_API_URL})",
    )
    session.add_argument(
        "--api-key", default=os.environ.get("LIPSYNC_API_KEY", ""), help="an API key (env LIPSYNC_API_KEY)"
    )
    actions = session.add_subparsers(dest="session_action", metavar="ACTION", required=True)

    start = actions.add_parser(
        "start", help="start a session; prints the start response (session id, audio URL)"
    )
    avatar = start.add_mutually_exclusive_group(required=True)
    avatar.add_argument("--frames-zip-url", help="http(s) URL of a zip of face frames")
    avatar.add_argument("--idle-video-url", help="http(s) URL of a short idle video of the face")
    start.add_argument("--room", help="publish into this LiveKit room")
    start.add_argument(
        "--identity", help="the avatar's LiveKit identity (default: the server's, in the response)"
    )
    start.add_argument("--publish-on-behalf", help="the agent identity the avatar stands in for")
    start.add_argument(
        "--no-publish-audio", action="store_true", help="publish video only (the caller publishes the speech)"
    )
    start.add_argument("--rtmp-url", help="rtmp(s):// URL: the fallback, or the only output without --room")
    start.add_argument("--record", action="store_true", help="also record an MP4 on the sidecar")
    start.add_argument("--session-id", help="your id for the session (default: generated)")
    start.add_argument("--idle-timeout-s", type=float, help="end the session after this long without audio")
    start.add_argument("--max-duration-s", type=float, help="end the session after this long")
    start.add_argument("--wait-live", action="store_true", help="return once the session is live (or failed)")
    start.set_defaults(handler=_start)

    status = actions.add_parser("status", help="a session's phase, output, sidecar, stats and error")
    status.add_argument("session_id")
    status.set_defaults(handler=_status)

    stop = actions.add_parser("stop", help="stop a session (idempotent)")
    stop.add_argument("session_id")
    stop.add_argument("--reason", default="stopped by lipsync session stop")
    stop.set_defaults(handler=_stop)

    stream = actions.add_parser(
        "stream", help="stream a 16-bit PCM WAV as one utterance; wait until it has played"
    )
    stream.add_argument("session_id")
    stream.add_argument("wav", type=Path, metavar="FILE.wav")
    stream.add_argument(
        "--audio-ws-url",
        help="the audio_ws_url from the start response (default: the session status's, else the API's route)",
    )
    stream.add_argument(
        "--fast", action="store_true", help="send faster than real time (the server buffers it)"
    )
    stream.set_defaults(handler=_stream)


def _start(args: argparse.Namespace) -> int:
    from lipsync_client import Avatar, LiveKitOutput  # noqa: PLC0415 (heavy: the separately packaged client)

    if args.room is None and args.rtmp_url is None:
        return _usage("start: give --room, --rtmp-url or both")

    async def run() -> dict[str, Any]:
        async with _client(args) as client:
            created = await client.create_session(
                avatar=Avatar(frames_zip_url=args.frames_zip_url, idle_video_url=args.idle_video_url),
                livekit=LiveKitOutput(
                    room=args.room,
                    identity=args.identity,
                    publish_audio=not args.no_publish_audio,
                    publish_on_behalf=args.publish_on_behalf,
                )
                if args.room
                else None,
                rtmp_url=args.rtmp_url,
                record=args.record,
                session_id=args.session_id,
                idle_timeout_s=args.idle_timeout_s,
                max_duration_s=args.max_duration_s,
            )
            body = dict(created.raw)
            if args.wait_live:
                body["status"] = (
                    await client.wait_until_live(created.session_id, timeout_s=READY_TIMEOUT_S)
                ).raw
            return body

    return _run(args, run)


def _status(args: argparse.Namespace) -> int:
    async def run() -> dict[str, Any]:
        async with _client(args) as client:
            return (await client.get_session(args.session_id)).raw

    return _run(args, run)


def _stop(args: argparse.Namespace) -> int:
    async def run() -> dict[str, Any]:
        async with _client(args) as client:
            return (await client.stop_session(args.session_id, args.reason)).raw

    return _run(args, run)


def _stream(args: argparse.Namespace) -> int:
    try:
        audio_format, pcm = read_wav(args.wav)
    except ValueError as exc:
        return _usage(str(exc))

    async def run() -> dict[str, Any]:
        async with _client(args) as client:
            url = args.audio_ws_url
            if not url:  # the server's own URL for it when its status names one (it may carry a token)
                status = await client.get_session(args.session_id)
                url = str(status.raw.get("audio_ws_url") or client.audio_ws_url(args.session_id))
            async with client.audio_stream(url, audio_format=audio_format) as audio:
                audio.add_listener(_print_event)
                await audio.wait_ready(READY_TIMEOUT_S)
                await audio.stream_pcm(pcm, realtime=not args.fast)
                buffered_s = 0.0 if not args.fast else len(pcm) / audio_format.bytes_per_sample_frame
                buffered_s /= audio_format.sample_rate_hz
                finished = await audio.next_event(
                    "playback_finished", timeout_s=FINISH_TIMEOUT_S + buffered_s
                )
            return {
                "session_id": args.session_id,
                "audio_s": round(
                    len(pcm) / audio_format.bytes_per_sample_frame / audio_format.sample_rate_hz, 3
                ),
                "playback_finished": finished,
            }

    return _run(args, run)


def read_wav(path: Path) -> tuple[Any, bytes]:
    """A WAV's PCM and its format; only 16-bit integer PCM is accepted (what `wave` can read and s16le is)."""
    from lipsync_client import AudioFormat  # noqa: PLC0415 (heavy: the separately packaged client)

    try:
        with wave.open(str(path), "rb") as wav:
            if wav.getsampwidth() != 2:
                raise ValueError(f"{path}: {8 * wav.getsampwidth()}-bit samples; convert it to 16-bit PCM")
            audio_format = AudioFormat(
                sample_rate_hz=wav.getframerate(), encoding="s16le", channels=wav.getnchannels()
            )
            pcm = wav.readframes(wav.getnframes())
    except (OSError, EOFError, wave.Error) as exc:
        raise ValueError(f"{path}: not a readable PCM WAV file ({exc})") from exc
    if not pcm:
        raise ValueError(f"{path}: the WAV holds no audio")
    return audio_format, pcm


def _client(args: argparse.Namespace) -> Any:
    from lipsync_client import LipsyncClient  # noqa: PLC0415 (heavy: the separately packaged client)

    return LipsyncClient(args.api_url, args.api_key)


def _print_event(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps({"event": event}) + "\n")
    sys.stdout.flush()


def _usage(message: str) -> int:
    sys.stderr.write(f"error: usage: {message}\n")
    return 2


def _run(args: argparse.Namespace, work: Any) -> int:
    from lipsync_client import LipsyncError  # noqa: PLC0415 (heavy: the separately packaged client)

    if not args.api_key:
        return _usage("no API key: pass --api-key or set LIPSYNC_API_KEY")
    try:
        result = asyncio.run(work())
    except LipsyncError as exc:
        sys.stderr.write(f"error: {exc.code}: {exc.message}\n")
        return 1
    except ValueError as exc:
        sys.stderr.write(f"error: invalid_argument: {exc}\n")
        return 1
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
