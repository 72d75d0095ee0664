"""The lip-sync engine: 16 kHz audio + an avatar → composited video frames. Pure and synchronous.

No asyncio, network or Temporal here; nothing heavy happens at import (torch, diffusers and
transformers are imported when an engine is built). Engines implement one protocol
(`realtime.engine.protocol.Engine`) and are registered by name in `realtime.engine.registry`:
**musetalk** (`realtime.engine.musetalk`: MuseTalk v1.5, whisper-tiny features → UNet at t=0 →
VAE decode → paste through a lower-face mask) and **preview** (CPU, no weights: the real
avatar's mouth opens with the audio level).

Public API (what the sidecar / scheduler calls)::

    from realtime.engine import EngineConfig, RenderRequest, create_engine

    selection = create_engine(EngineConfig(engine="auto", model_dir=Path("models"), device="auto"))
    selection.name, selection.reason          # the registered name, and a sentence saying why
    engine = selection.engine                 # realtime.engine.protocol.Engine
    engine.info                               # EngineInfo(name, version, device, dtype, model_dir, detail)
    engine.warm_up(batch_sizes=(1, 8, 32))    # -> ms
    engine.timing                             # FrameTiming: sample rate, fps, lookahead (ms, frames)

    # 1. Avatar: once per asset, cached on disk by content digest + engine version (+ VAE weights).
    avatar = engine.prepare_avatar(Path("avatar.zip") or raw_bytes,
                                   on_progress=lambda p: ...)   # PrepareProgress
    avatar.cache_hit, avatar.frame_count, avatar.width_px, avatar.height_px, avatar.digest_sha256
    avatar.cycle_length                       # ping-pong: frames 0..N-1 then N-1..0
    avatar.idle_frame(cycle_index)            # the unmodified frame at that cycle position

    # 2. Audio: one stream per session. Push float32 16 kHz mono chunks of any size; pull frames
    #    once their lookahead exists (engine.timing; both engines: 80 ms, frame i needs (i+3)*640 samples).
    stream = engine.open_stream()             # realtime.engine.audio.stream.AudioFeatureStream
    stream.push(chunk)                        # AudioInvalid on wrong dtype/shape/NaN
    frames = stream.pull(max_frames=None)     # list[FeatureFrame], in order
    padding = stream.end_of_utterance()       # pads to a whole frame with silence, flushes the rest
    dropped = stream.reset()                  # interrupt: drops unpulled audio, returns samples dropped
    # FeatureFrame: index (stream timeline, frame n = samples [n*640,(n+1)*640)), utterance,
    #   utterance_frame, features (engine-specific), rms_dbfs, speech_weight, padded

    # 3. Render: a batch of requests, possibly from many sessions and avatars; returns RGB uint8
    #    HxWx3 frames in request order. speech_weight 0 -> the idle frame (engine bypassed; returned
    #    as a read-only view of the cached frame: copy before drawing on it);
    #    0 < w < 1 crossfades the generated mouth with the idle frame.
    outputs = engine.render([RenderRequest(avatar, cycle_index, frame.features, frame.speech_weight), ...],
                            profile=None)     # StageProfile accumulates unet/vae_decode/blend ms

    engine.offline_frames(audio)              # whole-clip features with MuseTalk's exact indexing

Batching: `render` runs one UNet + one VAE call per chunk of `EngineConfig.max_batch_size`
speaking requests; the caller (issue 9's scheduler) chooses batch-size buckets. On CUDA the
latents, features, decoded faces and the blend stay on the GPU; only the blended crop regions
are copied to the host. Requests with `speech_weight == 0` or frames without a face never
reach the models. `render_async` splits a call in two (enqueue, then `result()`), so a caller
can prepare its next batch while the device computes this one. Errors are typed
(`realtime.engine.errors`, each with a `code`).
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
