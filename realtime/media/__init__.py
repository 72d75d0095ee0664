"""Encoding a session's composited video + audio with PyAV: RTMP output and MP4 recording.

Both outputs share one encoder configuration (H.264 zerolatency, GOP 2 s, no B-frames;
AAC 48 kHz) and take timestamps from the session's single clock: video frame N has
pts N at 1/fps, audio sample S has pts S at 1/48 000, so the muxed A/V alignment is the
session clock's, not the encoder's.
"""
