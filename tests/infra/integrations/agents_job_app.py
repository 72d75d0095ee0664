"""A livekit-agents worker (AgentServer) whose job entrypoint is the README's example, for
test_livekit_plugin.py.

Runs in the livekit-agents env (tests/support/framework_venv.py). It registers with the test's
livekit-server under an agent name; the test dispatches it to a room. The entrypoint is the
README's four lines around a real `AgentSession` with an espeak-ng TTS (no LLM, no STT):

    avatar = lipsync.AvatarSession(avatar=...)        # LIPSYNC_API_URL / LIPSYNC_API_KEY from the env
    await avatar.start(session, room=ctx.room)         # the room is not connected yet here
    await session.start(agent=Agent(...), room=ctx.room)

Protocol with the test: JSON lines on stdout (`{"event": ...}`); on stdin `say`, then `close`.
Jobs run on a thread of this process (JobExecutorType.THREAD), so they share its stdin/stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from agents_app import EspeakTTS, emit
from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobExecutorType
from livekit.plugins import lipsync


def build_server(args: argparse.Namespace, commands: asyncio.Queue[str]) -> AgentServer:
    server = AgentServer(
        ws_url=args.livekit_url,
        api_key=args.livekit_api_key,
        api_secret=args.livekit_api_secret,
        job_executor_type=JobExecutorType.THREAD,
        num_idle_processes=0,
        port=0,
    )
    server.on("worker_registered", lambda worker_id, _info: emit("registered", worker_id=worker_id))
    loop = asyncio.get_running_loop()

    async def next_command() -> str:
        # stdin is read on the main loop; the job runs on its own thread and loop
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(commands.get(), loop))

    @server.rtc_session(agent_name=args.agent_name)
    async def entrypoint(ctx: JobContext) -> None:
        try:
            await run_job(ctx)
        except Exception as exc:
            emit("job_failed", error=f"{type(exc).__name__}: {exc}")  # the test fails now, not at its timeout
            raise

    async def run_job(ctx: JobContext) -> None:
        session = AgentSession(tts=EspeakTTS())
        closed = asyncio.Event()
        session.on("close", lambda _event: closed.set())

        avatar = lipsync.AvatarSession(avatar=args.avatar_url)
        await avatar.start(session, room=ctx.room)
        await session.start(agent=Agent(instructions="You only say what you are told to say."), room=ctx.room)

        emit(
            "job_started",
            session_id=avatar.session_id,
            avatar_identity=avatar.avatar_identity,
            local_identity=ctx.room.local_participant.identity,
        )
        if await next_command() == "say":
            handle = session.say(args.text)
            await handle.wait_for_playout()
            emit("spoken", interrupted=handle.interrupted)
        if await next_command() == "close":
            await session.aclose()
            await closed.wait()
            emit("agent_session_closed")

    return server


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    commands: asyncio.Queue[str] = asyncio.Queue()

    async def read_commands() -> None:
        while line := await reader.readline():
            commands.put_nowait(line.decode().strip())

    server = build_server(args, commands)
    reading = asyncio.create_task(read_commands())
    try:
        await server.run(devmode=True)
    finally:
        reading.cancel()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    parser = argparse.ArgumentParser()
    for name in (
        "--livekit-url",
        "--livekit-api-key",
        "--livekit-api-secret",
        "--agent-name",
        "--avatar-url",
    ):
        parser.add_argument(name, required=True)
    parser.add_argument("--text", required=True)
    parsed: Any = parser.parse_args()
    asyncio.run(main(parsed))
