"""The lip-sync engine: 16 kHz audio + an avatar → composited video frames. Pure and synchronous.

No asyncio, network or Temporal here, and nothing heavy at import: torch, diffusers and
transformers load when an engine is built. Engines implement `realtime.engine.protocol.Engine`
and are registered by name in `realtime.engine.registry`; docs/engine.md shows how a caller
drives one (avatar → audio stream → batched render).
"""

from realtime.engine.audio.levels import SpeechGateConfig
from realtime.engine.audio.stream import AudioFeatureStream, FeatureFrame
from realtime.engine.avatar.prepared import Avatar, PrepareProgress
from realtime.engine.errors import EngineError
from realtime.engine.protocol import (
    Engine,
    EngineBase,
    EngineConfig,
    EngineInfo,
    FrameTiming,
    RenderHandle,
    RenderRequest,
    StageProfile,
)
from realtime.engine.registry import EngineSelection, create_engine

__all__ = [
    "AudioFeatureStream",
    "Avatar",
    "Engine",
    "EngineBase",
    "EngineConfig",
    "EngineError",
    "EngineInfo",
    "EngineSelection",
    "FeatureFrame",
    "FrameTiming",
    "PrepareProgress",
    "RenderHandle",
    "RenderRequest",
    "SpeechGateConfig",
    "StageProfile",
    "create_engine",
]
