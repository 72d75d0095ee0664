"""Async Python client for lipsync-live: sessions, stop, interrupt, viewer tokens, and the audio WebSocket.

async with LipsyncClient("https://lipsync.example.com", api_key) as client:
    created = await client.create_session(
        avatar=Avatar(frames_zip_url="https://assets.example.com/anna.zip"),
        livekit=LiveKitOutput(room="support-42"),
    )
    async with client.audio_stream(created) as audio:
        await audio.wait_ready()
        await audio.stream_pcm(pcm_s16le_16khz)
        await audio.next_event("playback_finished")
    await client.stop_session(created.session_id)
"""

from lipsync_client.audio import AudioStream
from lipsync_client.client import LipsyncClient
from lipsync_client.errors import (
    ApiError,
    ApiUnreachableError,
    AudioStreamError,
    LipsyncError,
    SessionFailedError,
    WaitTimeoutError,
)
from lipsync_client.models import (
    AudioFormat,
    Avatar,
    LiveKitInfo,
    LiveKitOutput,
    SessionCreated,
    SessionError,
    SessionPage,
    SessionStatus,
    SessionSummary,
    ViewerToken,
)

__all__ = [
    "ApiError",
    "ApiUnreachableError",
    "AudioFormat",
    "AudioStream",
    "AudioStreamError",
    "Avatar",
    "LipsyncClient",
    "LipsyncError",
    "LiveKitInfo",
    "LiveKitOutput",
    "SessionCreated",
    "SessionError",
    "SessionFailedError",
    "SessionPage",
    "SessionStatus",
    "SessionSummary",
    "ViewerToken",
    "WaitTimeoutError",
]
