"""Inbound audio: every way audio reaches a session, and everything that checks and converts it.

- `formats`, `decoder`, `resample`: what a client may send; one message -> mono float samples -> the
  session's 16 kHz timeline and 48 kHz playout (soxr).
- `protocol`: the audio WebSocket's text messages, both directions (docs/audio-protocol.md).
- `ratewatch`: a real-time stream's arrival rate against its declared sample rate.
- `input`: `AudioInput`, one source feeding a session (every check, the rejected-sample accounting).
- `connection`: `AudioConnection`, one audio WebSocket (the server routes sockets to it).
- `agents`: `AgentAudioBridge`, the livekit-agents avatar data-stream protocol.
- `session`: the protocols ingest needs from the layer above (`IngestSession`, `AudioSessions`);
  ingest never imports `realtime.sidecar`.
- `errors`: `IngestError` and its codes.
"""
