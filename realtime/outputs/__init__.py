"""Outputs: where a session's frames and audio go, tick by tick, from the session clock.

`base.Publisher` is the contract every output implements; `registry` declares each output
kind once (its parameters, its publisher factory, its URL guard). The LiveKit, RTMP and MP4
publishers live here with the PyAV encoding they share (`encoder`, `rtmp_stream`, `mp4`).
"""
