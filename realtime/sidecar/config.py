"""Sidecar configuration: one home for every knob, importable without loading livekit, torch or the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from realtime.ingest.formats import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_UTTERANCE_GAP_MS

TIMELINE_SAMPLE_RATE_HZ = 16_000
DEFAULT_PORT = 8790
DEFAULT_AVATAR_CACHE_MAX_BYTES = 8 << 30  # the avatar cache's cap: least recently used entries are evicted


@dataclass(frozen=True)
class RuntimeConfig:
    buffer_limit_ms: int = 60_000  # audio queued ahead of playback, per session
    render_budget_ms: float = 40.0  # frame 0 of an utterance is due at least this long after it is planned
    # Under load the lead grows with the render lane's measured batch time (RenderLane.planning_budget_ms): a
    # streamed utterance's frames are ready only that long before their ticks. TTFF grows by the same amount.
    # The lead's upper bound (kept below render_ahead_frames ticks): high enough for a GPU's full load of
    # sessions with its largest batches; a lightly loaded lane never gets near it
    # (bench/results/runtime-notes.md).
    max_render_budget_ms: float = 480.0
    # Batches a frame may wait through: the one in flight, then its own (2), plus room for the batch-time
    # jitter of a real GPU and the lane's feature work (2.0 leaves none: frames drop).
    render_budget_safety: float = 2.5
    render_ahead_frames: int = 16  # frames rendered ahead of the clock, at most
    # An utterance whose audio arrived ahead of real time starts with less lead than the load's planning
    # budget; its frames inside that budget jump the render lane's queue (SessionRuntime._first_tick_lead).
    first_frame_priority: bool = True

    @property
    def max_batch_ms(self) -> float:
        """The longest render batch the planning budget absorbs (admission control sizes capacity by it)."""
        return self.max_render_budget_ms / self.render_budget_safety

    render_batch_frames: int = 4  # frames per engine call, at most
    # ...and per job among an utterance's first frames: when many utterances start together, the lane
    # renders their frame 0s first, then their frame 1s, rather than each one's first four in turn (a lane
    # simulation at an H200's batch times: bench/results/lane-policy-*.json).
    first_frames_job_frames: int = 2
    # Ticks an utterance's start may wait for a frame 0 still in the render lane: a lead planned as short as
    # the lane's forecast allows is missed by a batch that runs a little long (GPU batch times vary by
    # 10-20 %), and waiting a tick costs 40 ms of TTFF where playing costs a dropped first frame.
    first_frame_wait_ticks: int = 2
    crossfade_frames: int = 2  # speech -> idle blend when an utterance ends on an open mouth
    resync_after_ms: float = 250.0  # a clock this late (event loop stalled) restarts from now
    lateness_window_ticks: int = 3000  # ticks kept for lateness percentiles

    @property
    def buffer_limit_samples(self) -> int:
        return self.buffer_limit_ms * TIMELINE_SAMPLE_RATE_HZ // 1000


@dataclass(frozen=True)
class HostConfig:
    sidecar_id: str = "sidecar-local"
    task_queue: str = "sidecar-local"
    slots_total: int = 4
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    video_delay_ms: float = 10.0  # see realtime.outputs.livekit (LiveKitPublisherOptions.video_delay_ms)
    max_video_bitrate_bps: int = 1_500_000
    renew_audio_after_stall_ms: float = 0.0  # 0 = off; see LiveKitPublisher._maybe_renew_audio_track
    idle_audio_reserve_ms: int = 0  # 0 = off; see LiveKitPublisherOptions.idle_audio_reserve_ms
    # An output disconnected this long ends the run `output_failed`, so the workflow moves the session to the
    # policy's next output. Short on purpose: outputs report a broken transport at once (LiveKit's signal
    # connection lost = reconnecting, RTMP's ffmpeg gone), and a viewer sees nothing meanwhile.
    output_down_timeout_s: float = 2.0
    # The share of time a session is expected to speak, for admission control: 1.0 (the default) sizes
    # capacity for every session speaking at once; a voice agent that listens half the time can run with ~0.5
    # (more sessions per GPU, with frames skipped under load if they all speak at once). In (0, 1].
    speech_duty: float = 1.0
    # Frames per cross-session render batch, at most (also the engine's device batch): large enough for a
    # GPU's full load of sessions; a lightly loaded lane runs small batches anyway.
    max_batch_frames: int = 64


@dataclass(frozen=True)
class ServerConfig:
    # The shared secret (realtime.sidecar.auth): its bearer form opens every route, audio tokens derive from
    # it. The server refuses to start without one.
    service_secret: str = field(default="", repr=False)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    utterance_gap_ms: int = DEFAULT_UTTERANCE_GAP_MS
    stats_interval_ms: int = 1000  # periodic `stats` messages on the audio WS (0: only on request)
    # An audio WS for a session this sidecar hosts whose output is not open yet waits this long for it (then
    # `unknown_session`), so a client (the API's relay) may connect while the session is still being brought
    # up and get `ready` the moment it can stream.
    output_open_wait_s: float = 30.0
    # The dev control API (POST/DELETE /v1/sessions/{id}) is off unless enabled, and even then opens only
    # avatar files under `dev_avatar_dir` and publishes only to the LiveKit URLs in `dev_livekit_urls`.
    dev_api: bool = False
    dev_avatar_dir: Path | None = None
    # Where the avatar cache is and its cap, for /healthz (the engine owns the cache itself).
    avatar_cache_dir: Path | None = None
    avatar_cache_max_bytes: int = DEFAULT_AVATAR_CACHE_MAX_BYTES
    dev_livekit_urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class SidecarSettings:
    bind_host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    engine: str = "auto"  # "auto" or a name in realtime.engine.registry
    model_dir: Path = Path("models")
    device: str = "auto"
    cache_dir: Path | None = None
    cache_max_bytes: int = DEFAULT_AVATAR_CACHE_MAX_BYTES
    warm_up_at_start: bool = True
    # GPU engine switches (realtime.engine.accel.AccelConfig). Compiling makes the first start minutes longer
    # (longer still with kernel tuning; shorter from its on-disk cache) and raises the sessions a GPU holds
    # (bench/results/runtime-notes.md).
    compile_mode: str = "off"  # one of realtime.engine.accel.COMPILE_MODES
    # with compile_mode: AccelConfig.compile_tuned_stages as its default, else none
    kernel_tuning: bool = True
    cuda_graphs: bool = True
    # With compile_mode: serve on eager CUDA graphs while the compiled ones build (AccelConfig): a node serves
    # within seconds of its start, at a lower batch rate until the swap (admission follows the measured one).
    serve_before_compile: bool = True
    host: HostConfig = field(default_factory=HostConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
