"""Audio side of the engine: 16 kHz timeline framing, levels/speech gate, whisper features, streams."""
