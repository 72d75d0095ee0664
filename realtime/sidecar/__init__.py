"""The sidecar: one process, one engine, many sessions.

- `runtime`: a session's 25-fps clock, idle cycle, speech frames, crossfades, interrupts, stats.
- `timeline`: the session's sample-indexed audio (utterances at 16 kHz and 48 kHz) and accounting.
- `audio_input`: one audio source (a WS connection or an agent byte stream) feeding a session.
- `engine_port`: what the runtime needs from the engine, and the adapter onto `realtime.engine`.
- `host`: `SidecarHost`, the `realtime.host.SessionHost` implementation the Temporal activities call.
- `server`: the HTTP/WS server (audio ingest, health, stats, a small dev control API).
- `process`: the process: one engine, the host and the server on one event loop (run by `lipsync sidecar`).
- `render_lane`: the process's one render lane (every session's engine work, earliest deadline first, batched).
"""
