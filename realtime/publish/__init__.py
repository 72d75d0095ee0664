"""Publishers: where a session's frames and audio go, tick by tick, from the session clock.

`base.Publisher` is the contract every output implements (LiveKit here; RTMP and MP4 wrap
`realtime.media`); a session fans each tick out to all of its publishers.
"""
