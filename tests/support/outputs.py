"""Session requests' outputs for tests, built the way the API builds them: specs via the output registry."""

from __future__ import annotations

from realtime.outputs.registry import LIVEKIT, RTMP, LiveKitParams, RtmpTarget
from workflows.contracts import OutputRequest, OutputSpec


def output_request(
    *, livekit: LiveKitParams | None = None, rtmp: RtmpTarget | None = None, record: bool = False
) -> OutputRequest:
    specs = []
    if livekit is not None:
        specs.append(OutputSpec(LIVEKIT.name, LIVEKIT.to_params(livekit)))
    if rtmp is not None:
        specs.append(OutputSpec(RTMP.name, RTMP.to_params(rtmp)))
    return OutputRequest(specs=specs, record=record)
