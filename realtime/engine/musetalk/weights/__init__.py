"""MuseTalk v1.5 model files: layout, validation (`check`), loading, tiny random checkpoints."""
