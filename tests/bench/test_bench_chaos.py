"""bench.chaos keeps a failed run's evidence: the work directory stays when a session was lost (or the run
did not complete), with each session's Temporal history (from a real dev server) and the lost sessions."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from pathlib import Path

import pytest
import websockets
from temporalio.client import Client

from bench.chaos import CHUNK_S, SPEECH_RATE_HZ, Chaos, ChaosDeployment, settle_work_dir, speak_until_closed
from workflows.client import session_workflow_id


def _work_dir(tmp_path: Path) -> Path:
    work_dir = tmp_path / "bench-chaos-run"
    (work_dir / "logs").mkdir(parents=True)
    (work_dir / "logs" / "bench-sidecar-0.log").write_text("sidecar log\n")
    return work_dir


@pytest.mark.parametrize(
    ("keep_on_failure", "lost", "completed", "kept"),
    [
        (True, [{"session": "s-1", "phase": "failed", "error": "sidecar_lost"}], True, True),
        (True, [], False, True),  # the run itself failed (raised): its logs are the evidence
        (True, [], True, False),  # a clean run leaves nothing behind
        (False, [{"session": "s-1", "phase": "unrecovered"}], True, False),  # --no-keep-on-failure
    ],
)
def test_the_work_directory_is_kept_only_for_a_failure_and_only_when_asked(
    tmp_path: Path, keep_on_failure: bool, lost: list[dict[str, str]], completed: bool, kept: bool
) -> None:
    work_dir = _work_dir(tmp_path)
    assert settle_work_dir(work_dir, keep_on_failure=keep_on_failure, lost=lost, completed=completed) is kept
    assert work_dir.exists() is kept
    if kept:
        assert (work_dir / "logs" / "bench-sidecar-0.log").read_text() == "sidecar log\n"


@pytest.mark.service
async def test_a_loss_keeps_every_sessions_history_and_the_lost_sessions(
    temporal_client: Client, tmp_path: Path
) -> None:
    work_dir = _work_dir(tmp_path)
    chaos = Chaos(ChaosDeployment(work_dir, 1, 1), 2, random.Random(1), 60.0)
    chaos.temporal = temporal_client
    live, lost, never_started = (f"chaos-{uuid.uuid4().hex[:8]}" for _ in range(3))
    # Workflows no worker serves: they exist with a history of their start, which is all this needs.
    handles = [
        await temporal_client.start_workflow(
            "SessionWorkflow", id=session_workflow_id(session_id), task_queue=f"nobody-{uuid.uuid4().hex}"
        )
        for session_id in (live, lost)
    ]
    try:
        chaos.sessions = [live]
        chaos.lost = [
            {"session": lost, "phase": "failed", "error": "sidecar_lost"},
            {"session": never_started, "phase": "unrecovered"},  # no history: skipped, the rest is kept
        ]
        chaos.faults = [{"kind": "sidecar_kill", "sidecar": "bench-sidecar-0"}]
        await chaos.keep_evidence(work_dir)
    finally:
        for handle in handles:
            await handle.terminate("test over")
    histories = sorted(path.name for path in (work_dir / "histories").iterdir())
    assert histories == sorted([f"{live}.json", f"{lost}.json"])
    started = json.loads((work_dir / "histories" / f"{lost}.json").read_text())["events"][0]
    assert started["eventType"] in ("EVENT_TYPE_WORKFLOW_EXECUTION_STARTED", "WorkflowExecutionStarted")
    evidence = json.loads((work_dir / "lost.json").read_text())
    assert [entry["session"] for entry in evidence["lost"]] == [lost, never_started]
    assert evidence["faults"] == chaos.faults


async def test_the_speech_client_sends_paced_utterances_and_counts_playback_finished() -> None:
    """`speak_until_closed` (the chaos and outage benches' client) waits for `ready`, sends each utterance
    in CHUNK_S messages then `end_of_utterance`, counts every `playback_finished`, and returns when the
    sidecar closes the socket."""
    speech = bytes(int(SPEECH_RATE_HZ * CHUNK_S) * 2 * 2 + 100)  # two whole chunks and a partial one
    received: list[bytes | str] = []

    async def sidecar(ws: websockets.ServerConnection) -> None:
        await ws.send(json.dumps({"type": "ready"}))
        utterances = 0
        async for message in ws:
            received.append(message)
            if isinstance(message, str) and json.loads(message)["type"] == "end_of_utterance":
                utterances += 1
                await ws.send(json.dumps({"type": "playback_finished"}))
                if utterances == 2:
                    await ws.close()

    finished: list[int] = []
    async with websockets.serve(sidecar, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
            await asyncio.wait_for(speak_until_closed(ws, speech, lambda: finished.append(1)), timeout=30)
    per_utterance = [len(m) for m in received[:4]]
    assert per_utterance[:3] == [int(SPEECH_RATE_HZ * CHUNK_S) * 2] * 2 + [100]
    assert json.loads(received[3]) == {"type": "end_of_utterance"}
    assert sum(isinstance(m, str) for m in received) == 2 and len(finished) == 2
