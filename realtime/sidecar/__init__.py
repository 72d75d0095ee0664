"""The sidecar: one process, one engine, many sessions.

- `runtime`: a session's 25-fps clock, idle cycle, speech frames, crossfades, interrupts, stats.
- `timeline`: the session's sample-indexed audio (utterances at 16 kHz and 48 kHz) and accounting.
- `engine_port`: what the runtime needs from the engine, and the adapter onto `realtime.engine`.
- `host`: `SidecarHost`, the `realtime.host.SessionHost` implementation the Temporal activities call.
- `server`: the HTTP/WS routes (the audio socket itself is `realtime.ingest.connection`).
- `dev_api`: the opt-in dev control API, which drives the same `SessionHost` calls as the activities.
- `process`: the process: one engine, the host and the server on one event loop (run by `lipsync sidecar`).
- `render_lane`: the process's one render lane (every session's engine work, earliest deadline first,
batched).
"""
