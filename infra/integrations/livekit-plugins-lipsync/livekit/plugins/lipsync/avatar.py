"""`AvatarSession`: put a lipsync-live avatar in front of a livekit-agents `AgentSession`.

    avatar = lipsync.AvatarSession(avatar="https://assets.example.com/anna.zip")
    await avatar.start(session, room=ctx.room)
    await session.start(agent=MyAgent(), room=ctx.room)

`start` asks the lipsync-live API for a session in the agent's room (the avatar publishes on
behalf of the agent's identity), sends the agent's speech to the avatar with livekit-agents'
`DataStreamAudioOutput` (byte streams on `lk.audio_stream`, `lk.clear_buffer` for
interruptions, `lk.playback_finished` back), waits until the avatar has joined the room, and
stops the lipsync-live session when the agent session closes. The avatar publishes the speech
itself, in sync with the lips, so the agent publishes no audio track of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from lipsync_client import Avatar, LipsyncClient, LipsyncError, LiveKitOutput, SessionCreated
from livekit import rtc
from livekit.agents import AgentSession, get_job_context, utils
from livekit.agents.voice.avatar import DataStreamAudioOutput

logger = logging.getLogger("livekit.plugins.lipsync")

DEFAULT_JOIN_TIMEOUT_S = 60.0
STATUS_POLL_INTERVAL_S = 0.5


class LipsyncAvatarError(LipsyncError):
    """The avatar could not be started, or did not join the room in time; `code` says which.

    `session_id` names the lipsync-live session when one was started (its status tells more).
    """

    def __init__(self, message: str, *, code: str, session_id: str | None = None) -> None:
        super().__init__(message, code=code)
        self.session_id = session_id


class AvatarSession:
    """A lipsync-live avatar for one agent session.

    `api_url` / `api_key` default to `LIPSYNC_API_URL` / `LIPSYNC_API_KEY`. `avatar` is the
    face: a frames-zip URL, or a `lipsync_client.Avatar` (for an idle video). The avatar's
    LiveKit identity comes from the service's answer (`avatar_identity` after `start`), unless
    `avatar_participant_identity` asks for one.
    """

    def __init__(
        self,
        api_url: str | None = None,
        api_key: str | None = None,
        *,
        avatar: str | Avatar,
        publish_audio: bool = True,
        avatar_participant_identity: str | None = None,
        join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S,
        session_id: str | None = None,
        idle_timeout_s: float | None = None,
        max_duration_s: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        api_url = api_url or os.environ.get("LIPSYNC_API_URL", "")
        api_key = api_key or os.environ.get("LIPSYNC_API_KEY", "")
        if not api_url or not api_key:
            raise LipsyncAvatarError(
                "api_url and api_key must be given, as arguments or as LIPSYNC_API_URL / LIPSYNC_API_KEY",
                code="missing_configuration",
            )
        if not publish_audio:
            # DataStreamAudioOutput replaces the agent's own audio output: with the avatar silent,
            # nobody would publish the speech.
            raise LipsyncAvatarError(
                "publish_audio=False is not supported by the agents plugin: the agent's speech goes to the "
                "avatar, which must publish it (in sync with the lips)",
                code="unsupported_option",
            )
        if join_timeout_s <= 0:
            raise ValueError("join_timeout_s must be positive")
        self._avatar = avatar if isinstance(avatar, Avatar) else Avatar(frames_zip_url=avatar)
        self._client = LipsyncClient(api_url, api_key)
        self._identity = avatar_participant_identity
        self._join_timeout_s = join_timeout_s
        self._options: dict[str, Any] = {
            "session_id": session_id,
            "idle_timeout_s": idle_timeout_s,
            "max_duration_s": max_duration_s,
            "metadata": metadata,
        }
        self._created: SessionCreated | None = None
        self._closing: asyncio.Task[None] | None = None

    @property
    def session_id(self) -> str:
        return self._started().session_id

    @property
    def avatar_identity(self) -> str:
        created = self._started()
        assert created.livekit is not None
        return created.livekit.identity

    @property
    def created(self) -> SessionCreated:
        """The service's start response (status URL, Temporal UI link, trace id)."""
        return self._started()

    async def start(self, agent_session: AgentSession, room: rtc.Room) -> None:
        """Start the avatar in `room` and route `agent_session`'s audio to it; returns once it has joined."""
        if self._created is not None:
            raise LipsyncAvatarError("this AvatarSession was already started", code="already_started")
        job = get_job_context(required=False)
        if not room.isconnected() and job is not None and job.room is room:
            # In a job the room is connected by session.start(), which comes after this call; waiting
            # for the avatar needs it now. JobContext.connect() is idempotent, so session.start's is a no-op.
            await job.connect()
        agent_identity = _agent_identity(room)
        created = await self._client.create_session(
            avatar=self._avatar,
            livekit=LiveKitOutput(
                room=room.name, identity=self._identity, publish_audio=True, publish_on_behalf=agent_identity
            ),
            **self._options,
        )
        if created.livekit is None:
            await self._client.stop_session(
                created.session_id, "the service answered without a LiveKit output"
            )
            raise LipsyncAvatarError(
                "the service started the session without a LiveKit output", code="bad_response"
            )
        self._created = created
        avatar_identity = created.livekit.identity
        logger.info(
            "lipsync avatar session started",
            extra={"session_id": created.session_id, "avatar_identity": avatar_identity, "room": room.name},
        )

        agent_session.output.audio = DataStreamAudioOutput(
            room, destination_identity=avatar_identity, wait_remote_track=rtc.TrackKind.KIND_VIDEO
        )

        def on_close(_event: object) -> None:
            self._close_soon("the agent session closed")

        agent_session.on("close", on_close)
        if job is not None:

            async def on_shutdown(reason: str = "") -> None:
                await self.aclose(f"the agent job shut down {reason}".strip())

            job.add_shutdown_callback(on_shutdown)

        try:
            await self._wait_for_avatar(room, avatar_identity)
        except BaseException:
            await asyncio.shield(self.aclose("the avatar did not join"))
            raise

    async def aclose(self, reason: str = "the agent ended the avatar session") -> None:
        """Stop the lipsync-live session (idempotent) and release the HTTP client."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._stop(reason))
        await asyncio.shield(self._closing)

    # --- internals ------------------------------------------------------------------------

    def _started(self) -> SessionCreated:
        if self._created is None:
            raise LipsyncAvatarError(
                "the avatar session is not started: await start() first", code="not_started"
            )
        return self._created

    def _close_soon(self, reason: str) -> None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._stop(reason))

    async def _stop(self, reason: str) -> None:
        try:
            if self._created is not None:
                status = await self._client.stop_session(self._created.session_id, reason)
                logger.info(
                    "lipsync avatar session stopped",
                    extra={"session_id": status.session_id, "phase": status.phase, "reason": reason},
                )
        except LipsyncError as exc:
            # The service may already have ended it (idle timeout, max duration); never raise from a close.
            logger.warning(
                "stopping the lipsync avatar session failed", extra={"error": str(exc), "code": exc.code}
            )
        finally:
            await self._client.aclose()

    async def _wait_for_avatar(self, room: rtc.Room, identity: str) -> None:
        """Until `identity` is in the room; a session that fails first, or the timeout, raises with the
        reason."""
        assert self._created is not None
        session_id = self._created.session_id
        joined = asyncio.ensure_future(utils.wait_for_participant(room=room, identity=identity))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._join_timeout_s
        phase = "unknown"
        try:
            while not joined.done():
                status = await self._client.get_session(session_id)
                phase = status.phase
                if status.is_terminal:
                    error = status.error
                    raise LipsyncAvatarError(
                        f"the avatar session {session_id} ended before the avatar joined room {room.name!r}: "
                        + (
                            f"{error.code}: {error.message}"
                            if error
                            else f"phase {phase}, {status.end_reason}"
                        ),
                        code=error.code if error else "session_ended",
                        session_id=session_id,
                    )
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise LipsyncAvatarError(
                        f"the avatar {identity!r} did not join room {room.name!r} within "
                        f"{self._join_timeout_s:.0f} s "
                        f"(session {session_id} is {phase!r}; its Temporal history: "
                        f"{self._created.temporal_ui_url})",
                        code="avatar_join_timeout",
                        session_id=session_id,
                    )
                await asyncio.wait({joined}, timeout=min(STATUS_POLL_INTERVAL_S, remaining))
            joined.result()
        finally:
            joined.cancel()
        logger.info(
            "lipsync avatar joined the room", extra={"session_id": session_id, "avatar_identity": identity}
        )


def _agent_identity(room: rtc.Room) -> str:
    """The identity the avatar publishes on behalf of: the room's local participant (the agent)."""
    if not room.isconnected():
        raise LipsyncAvatarError(
            "the room is not connected and it is not this job's room: connect it before start()",
            code="room_not_connected",
        )
    return str(room.local_participant.identity)
