"""MuseTalk v1.5: everything specific to it — weights layout and loader, whisper features, VAE
latents of avatar crops, the crop compositor and the engine itself. Registered as "musetalk"
in `realtime.engine.registry`."""
