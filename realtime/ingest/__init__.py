"""Audio ingest: client PCM (any supported format) -> the session's 16 kHz and 48 kHz mono float timelines.

`formats` declares what a client may send, `decoder` turns one message into mono float
samples (or a typed `IngestError`), `resample` converts them with soxr to the engine's
16 kHz timeline and the publishers' 48 kHz playout, `protocol` parses and builds the WS
messages. The network side (the WS endpoint) lives in `realtime.sidecar.server`.
"""
