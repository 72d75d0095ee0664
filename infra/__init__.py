"""Local infrastructure: install and launch the real services (Temporal, livekit-server, nginx-rtmp).

One module per service; the pytest fixtures and `lipsync stack` share them.
"""
