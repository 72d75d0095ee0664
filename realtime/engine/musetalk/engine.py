"""The MuseTalk v1.5 engine: batched UNet (t=0) → VAE decode → paste into the frame.

Per frame the UNet sees `[8, 32, 32]` latents (VAE latents of the 256² crop with its lower half
blacked out, concatenated with the latents of the whole crop) and the frame's `[50, 384]`
whisper window plus positional encoding as cross-attention context; its `[4, 32, 32]` output,
divided by the VAE scaling factor, decodes to the new 256² face. One `render` call may mix
requests of many sessions and avatars; everything stays on the engine's device until the
blended crop regions are copied out (see `composite`).

On CUDA the UNet and VAE run at fixed batch buckets, as replayed CUDA graphs and optionally
compiled by inductor (`realtime.engine.accel`, switched by `EngineConfig.accel`).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from realtime.engine.accel import (
    BucketGraphs,
    bucket_for,
    compile_fn,
    configure_compile_cache,
    mark_batch_dynamic,
    pad_batch,
)
from realtime.engine.artifacts import (
    ArtifactKey,
    PrebuiltWarmUp,
    default_artifacts_root,
    model_hash,
    settings_json,
    warm_up_with_artifacts,
)
from realtime.engine.audio.framing import SAMPLES_PER_FRAME
from realtime.engine.audio.levels import frame_rms_dbfs, speech_weights
from realtime.engine.audio.stream import AudioFeatureStream, FeatureFrame
from realtime.engine.avatar.prepare import load_face_box_models, prepare_avatar
from realtime.engine.avatar.prepared import Avatar, PrepareProgress
from realtime.engine.errors import RenderRequestInvalid
from realtime.engine.groupnorm import set_group_norm_mode
from realtime.engine.hotswap import ServingState, VariantSwap
from realtime.engine.musetalk.composite import Compositor, PasteJob, PendingPaste
from realtime.engine.musetalk.latents import encode_crop_latents
from realtime.engine.musetalk.whisper import WhisperStreamFeaturizer, WhisperWindows
from realtime.engine.protocol import (
    EngineBase,
    EngineConfig,
    EngineInfo,
    RenderRequest,
    StageProfile,
    maybe_stage,
)
from realtime.engine.upsample import set_upsample_conv_mode

if TYPE_CHECKING:
    import torch

    from realtime.engine.musetalk.weights.loader import MuseTalkModels

logger = logging.getLogger(__name__)

ENGINE_NAME = "musetalk"
ENGINE_VERSION = "musetalk-v15-engine-1"


class MuseTalkEngine(EngineBase):
    def __init__(
        self, models: MuseTalkModels, config: EngineConfig, model_dir: Path | None = None, *, detail: str = ""
    ) -> None:
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        self._models = models
        self._config = config
        self._device = models.device.torch_device()
        self._dtype = models.device.torch_dtype()
        accel = config.accel
        self._accel = accel
        cuda = self._device.type == "cuda"
        self._graphs_on = cuda and accel.cuda_graphs
        self._compile_on = cuda and accel.compile_mode != "off"
        self._windows = WhisperWindows(models, cuda_graph=self._graphs_on, buckets=accel.batch_buckets)
        self._compositor = Compositor(
            self._device, pinned=accel.pinned_transfers, copy_stream=accel.overlap_copy
        )
        self._latents: dict[str, torch.Tensor] = {}  # avatar key -> [N, 8, 32, 32] on device
        self._timestep = torch.zeros(1, device=self._device, dtype=torch.long)
        if cuda:
            torch.backends.cudnn.benchmark = accel.cudnn_benchmark
        self._set_layer_modes(compiled=self._compile_on)
        if cuda and accel.channels_last:
            models.unet.to(memory_format=torch.channels_last)
            models.vae.to(memory_format=torch.channels_last)
        self.compile_cache_dir: Path | None = None
        self._unet_compiled: Callable[..., Any] | None = None  # buckets >= 2 (dynamic batch)
        self._vae_compiled: Callable[..., Any] | None = None
        self._unet_compiled_batch1: Callable[..., Any] | None = None  # bucket 1 (static)
        self._vae_compiled_batch1: Callable[..., Any] | None = None
        if self._compile_on:
            self.compile_cache_dir = configure_compile_cache(accel.compile_cache_dir)
            self._unet_compiled, self._unet_compiled_batch1 = self._compile_stage(self._unet_forward, "unet")
            self._vae_compiled, self._vae_compiled_batch1 = self._compile_stage(
                self._decode_faces, "vae_decode"
            )
        self._graph_stages: tuple[BucketGraphs, BucketGraphs] | None = None
        # Graphs replaced by a swap: kept, since a batch enqueued on them may still run.
        self._retired_stages: list[tuple[BucketGraphs, BucketGraphs]] = []
        self._swap: VariantSwap[_CompiledVariant] | None = None  # serving before the compiled graphs exist
        self.background_report: PrebuiltWarmUp | None = None  # the background compile's, once it is done
        self._warm_up_batch_ms: dict[int, float] = {}
        self._info = EngineInfo(
            name=ENGINE_NAME,
            version=ENGINE_VERSION,
            device=models.device.device,
            dtype=models.device.dtype_name,
            model_dir=model_dir,
            detail=detail
            or (
                f"MuseTalk v1.5 weights from {model_dir}"
                if model_dir
                else "MuseTalk v1.5 with random weights"
            )
            + f"; {models.blend_mask_note}",
        )

    def _set_layer_modes(self, *, compiled: bool) -> None:
        """The upsample-conv and group-norm forms of the compiled path or of the eager one (exact rewrites,
        on any device; switched back to the modules' own forward when off: models may be shared). Captured
        graphs keep the form they were captured with."""
        cuda = self._device.type == "cuda"
        upsample_mode = self._accel.upsample_conv_for(cuda, compiled)
        models = self._models
        upsamplers = sum(set_upsample_conv_mode(m, upsample_mode) for m in (models.unet, models.vae))
        logger.info("upsample convolutions", extra={"mode": upsample_mode, "layers": upsamplers})
        norm_mode = self._accel.group_norm_for(cuda, compiled)
        # The models the render path compiles; the VAE encoder (avatar preparation) runs eager, where torch's
        # own group norm is the faster one.
        norms = sum(set_group_norm_mode(m, norm_mode) for m in (models.unet, models.vae.decoder))
        logger.info("group norms", extra={"mode": norm_mode, "layers": norms})

    def _compile_stage(
        self, fn: Callable[..., torch.Tensor], stage: str
    ) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """(compiled for buckets >= 2, compiled for bucket 1): one wrapper, or two when the shared one
        tunes its kernels (the batch-1 compile is left untuned: tuning costs minutes of compile per graph)."""
        accel = self._accel
        tuned = stage in accel.compile_tuned_stages
        shared = compile_fn(
            fn, accel.compile_mode, channels_last=accel.compile_channels_last, tune_kernels=tuned
        )
        if not tuned:
            return shared, shared
        return shared, compile_fn(fn, accel.compile_mode, channels_last=accel.compile_channels_last)

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def models(self) -> MuseTalkModels:
        return self._models

    # --- avatars -----------------------------------------------------------------------------

    def encode_latents(self, crops: np.ndarray) -> np.ndarray:
        """Masked (lower half black) + reference latents `[B, 8, 32, 32]` of 256² RGB crops, as upstream."""
        return encode_crop_latents(
            self._models.vae, self._models.vae_scaling_factor, self._device, self._dtype, crops
        )

    def prepare_avatar(
        self, source: bytes | Path, *, on_progress: Callable[[PrepareProgress], None] | None = None
    ) -> Avatar:
        return prepare_avatar(
            source,
            engine=ENGINE_NAME,
            engine_version=ENGINE_VERSION,
            model_fingerprint=self._models.avatar_fingerprint,
            cache_root=self._config.cache_dir,
            cache_max_bytes=self._config.cache_max_bytes,
            encode_latents=self.encode_latents,
            on_progress=on_progress,
            settings=self._config.prepare,
            parse_faces=self._models.face_parser.labels if self._models.face_parser is not None else None,
        )

    def forget_avatar(self, avatar: Avatar) -> None:
        """Release the device copies of an avatar no session uses any more."""
        self._latents.pop(avatar.key, None)
        self._compositor.forget(avatar.key)

    def _avatar_latents(self, avatar: Avatar) -> torch.Tensor:
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        latents = self._latents.get(avatar.key)
        if latents is None:
            if avatar.latents is None:
                raise RenderRequestInvalid(
                    f"avatar {avatar.key} was prepared by the {avatar.engine} engine: no latents"
                )
            latents = torch.from_numpy(np.asarray(avatar.latents)).to(self._device, self._dtype)
            self._latents[avatar.key] = latents
        return latents

    # --- audio -------------------------------------------------------------------------------

    def open_stream(self) -> AudioFeatureStream:
        return AudioFeatureStream(WhisperStreamFeaturizer(self._windows), self._config.gate)

    def prefetch_features(self, streams: Sequence[AudioFeatureStream], max_frames: Sequence[int]) -> int:
        """Encode, in one batched whisper call, what `streams[i].pull(max_frames[i])` would each encode.

        The render lane calls this for every stream of a cross-session batch before pulling them:
        the pulls then find their segments cached. Returns the number of segments encoded.
        """
        plan = [
            item
            for stream, count in zip(streams, max_frames, strict=True)
            for item in stream.encode_plan(count)
        ]
        if not plan:
            return 0
        chunk = self._accel.max_bucket
        for start in range(0, len(plan), chunk):
            part = plan[start : start + chunk]
            hidden = self._windows.encode_segments([audio for _, _, audio in part])
            for (featurizer, segment, audio), states in zip(part, hidden, strict=True):
                featurizer.store(segment, len(audio), states)
        return len(plan)

    def offline_windows(self, audio: np.ndarray) -> torch.Tensor:
        """MuseTalk's whole-clip `[F, 50, 384]` windows (before positional encoding), F = floor(len/640)."""
        return self._windows.offline_windows(np.asarray(audio, dtype=np.float32))

    def offline_frames(self, audio: np.ndarray) -> list[FeatureFrame]:
        """Whole-clip features indexed exactly as upstream, with the same speech gate as streams."""
        audio = np.asarray(audio, dtype=np.float32)
        windows = self._windows.add_positional_encoding(self.offline_windows(audio))
        rms = frame_rms_dbfs(audio)
        weights = speech_weights(rms, self._config.gate)
        return [
            FeatureFrame(
                index=i,
                utterance=0,
                utterance_frame=i,
                features=windows[i],
                rms_dbfs=float(rms[i]),
                speech_weight=float(weights[i]),
                padded=(i + 1) * SAMPLES_PER_FRAME > len(audio),
            )
            for i in range(windows.shape[0])
        ]

    # --- rendering ---------------------------------------------------------------------------

    def render(
        self, requests: Sequence[RenderRequest], *, profile: StageProfile | None = None
    ) -> list[np.ndarray]:
        """Composited RGB uint8 frames, one per request, in order (bypassed ones are read-only idle
        frames)."""
        return self.render_async(requests, profile=profile).result()

    def render_async(
        self, requests: Sequence[RenderRequest], *, profile: StageProfile | None = None
    ) -> PendingRender:
        """Enqueue the device work for `requests` and return before it is done (with pinned transfers on CUDA:
        nothing here waits for the device); `result()` waits and assembles the frames. The render lane starts
        its next batch in between, so the host's frame assembly overlaps the device's next batch. Call
        `result()` of each handle once, on this engine's thread, in the order the handles were made."""
        outputs: list[np.ndarray | None] = [None] * len(requests)
        active: list[tuple[int, int]] = []  # (request index, avatar frame)
        for index, request in enumerate(requests):
            frame = request.avatar.frame_at(request.frame_index)
            if request.speech_weight <= 0.0 or not request.avatar.has_face[frame]:
                outputs[index] = request.avatar.frames[frame]
            else:
                active.append((index, frame))
        chunk = self.chunk_frames
        timing = self._device_events() if active else None
        # Every chunk is enqueued before the first is assembled: the device runs ahead of the host.
        pending = []
        for start in range(0, len(active), chunk):
            part = active[start : start + chunk]
            pending.append(
                (part, self._start_active([requests[i] for i, _ in part], [f for _, f in part], profile))
            )
        if timing is not None:
            timing[1].record()
        if profile is not None:
            profile.frames += len(requests)
        return PendingRender(outputs, pending, functools.partial(self._collect, profile=profile), timing)

    def _device_events(self) -> tuple[Any, Any] | None:
        """(begin recorded now, end to record) timing events on CUDA: a handle's device time and readiness."""
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        if self._device.type != "cuda":
            return None
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        return begin, end

    @property
    def chunk_frames(self) -> int:
        """Frames per device batch: `max_batch_size`, capped at the largest bucket when shapes are
        bucketed."""
        chunk = max(1, self._config.max_batch_size)
        if self._graphs_on or self._compile_on:
            chunk = min(chunk, self._accel.max_bucket)
        return chunk

    def _collect(self, paste: PendingPaste, profile: StageProfile | None) -> list[np.ndarray]:
        with maybe_stage(profile, "blend"):
            return self._compositor.finish(paste)

    def _start_active(
        self, requests: list[RenderRequest], frames: list[int], profile: StageProfile | None
    ) -> PendingPaste:
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        with torch.inference_mode():
            latents = torch.stack(
                [self._avatar_latents(r.avatar)[f] for r, f in zip(requests, frames, strict=True)]
            )
            features = self._stack_features(requests)
            faces = self._faces(latents, features, profile)
            with maybe_stage(profile, "blend"):
                jobs = [
                    PasteJob(r.avatar, f, row, min(1.0, float(r.speech_weight)))
                    for row, (r, f) in enumerate(zip(requests, frames, strict=True))
                ]
                return self._compositor.paste_async(faces, jobs)

    # --- the models at bucket sizes ------------------------------------------------------------

    def _unet_forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return unet_step(self._models, latents, features, self._timestep)

    def _decode_faces(self, predicted: torch.Tensor) -> torch.Tensor:
        """UNet output latents -> faces `[B, 3, 256, 256]` in [0, 1] (lower rows only: see
        `LOWER_DECODE_NOTE`)."""
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        first_row = self._accel.decode_from_latent_row
        if first_row > 0:
            predicted = predicted[:, :, first_row:]
        faces = decode_faces(self._models, predicted)
        if first_row > 0:
            # Rows above the crop are under the mask's zero: replicate the first decoded row (no seam in the
            # resize).
            top = faces[:, :, :1].expand(-1, -1, first_row * 8, -1)
            faces = torch.cat([top, faces], dim=2)
        return faces

    def _compiled_for(self, batch: int) -> bool:
        # Bucket 1 is a second (static) compile; without it, it runs eager (launch-bound, which graphs fix).
        return batch >= 2 or self._accel.compile_batch1

    def _unet_fn(self, batch: int, *, compiled: bool = True) -> Callable[..., torch.Tensor]:
        compiled_fn = self._unet_compiled if batch >= 2 else self._unet_compiled_batch1
        if compiled and compiled_fn is not None and self._compiled_for(batch):
            return compiled_fn
        return self._unet_forward

    def _vae_fn(self, batch: int, *, compiled: bool = True) -> Callable[..., torch.Tensor]:
        compiled_fn = self._vae_compiled if batch >= 2 else self._vae_compiled_batch1
        if compiled and compiled_fn is not None and self._compiled_for(batch):
            return compiled_fn
        return self._decode_faces

    def _stages(self) -> tuple[BucketGraphs, BucketGraphs]:
        """The graphs the render path replays now (made on first use: compiled when compile is on)."""
        stages = self._graph_stages  # one read: a background swap may replace it between two batches
        if stages is None:
            stages = self._graph_stages = self._make_stages(compiled=self._compile_on)
        return stages

    def _make_stages(self, *, compiled: bool) -> tuple[BucketGraphs, BucketGraphs]:
        """UNet and VAE-decode graphs per bucket, of the compiled functions or of the eager modules, in a
        memory pool of their own."""
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        pool = torch.cuda.graph_pool_handle()
        max_batch = self._accel.max_bucket
        marker = (lambda ts: mark_batch_dynamic(ts, max_batch)) if compiled and self._compile_on else None

        def unet(latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
            return self._unet_fn(int(latents.shape[0]), compiled=compiled)(latents, features)

        def vae(predicted: torch.Tensor) -> torch.Tensor:
            return self._vae_fn(int(predicted.shape[0]), compiled=compiled)(predicted)

        return (
            BucketGraphs(unet, self._device, pool, before_capture=_skip_batch1(marker)),
            BucketGraphs(vae, self._device, pool, before_capture=_skip_batch1(marker)),
        )

    def _faces(
        self, latents: torch.Tensor, features: torch.Tensor, profile: StageProfile | None
    ) -> torch.Tensor:
        count = int(latents.shape[0])
        if not (self._graphs_on or self._compile_on):
            with maybe_stage(profile, "unet"):
                predicted = self._unet_forward(latents, features)
            with maybe_stage(profile, "vae_decode"):
                return self._decode_faces(predicted)
        bucket = bucket_for(count, self._accel.batch_buckets)
        latents, features = pad_batch(latents, bucket), pad_batch(features, bucket)
        if self._accel.channels_last:
            latents = latents.contiguous(memory_format=_channels_last())
        if self._graphs_on:
            unet_graphs, vae_graphs = self._stages()
            with maybe_stage(profile, "unet"):
                predicted = unet_graphs.run(latents, features)
            with maybe_stage(profile, "vae_decode"):
                faces = vae_graphs.run(predicted)
        else:
            if bucket >= 2:
                mark_batch_dynamic([latents, features], self._accel.max_bucket)
            with maybe_stage(profile, "unet"):
                predicted = self._unet_fn(bucket)(latents, features)
            if bucket >= 2:
                mark_batch_dynamic([predicted], self._accel.max_bucket)
            with maybe_stage(profile, "vae_decode"):
                faces = self._vae_fn(bucket)(predicted)
        return faces[:count]

    def _stack_features(self, requests: list[RenderRequest]) -> torch.Tensor:
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        rows = []
        for request in requests:
            feature: Any = request.features
            if not isinstance(feature, torch.Tensor) or tuple(feature.shape) != (50, 384):
                raise RenderRequestInvalid(
                    "musetalk render requests need [50, 384] whisper windows from this engine's stream, got "
                    f"{type(feature).__name__} {getattr(feature, 'shape', '')}"
                )
            rows.append(feature)
        return torch.stack(rows).to(self._device, self._dtype)

    def unet_inputs(self, requests: Sequence[RenderRequest]) -> tuple[np.ndarray, np.ndarray]:
        """(UNet input latents [B,8,32,32], UNet output latents [B,4,32,32]) for diagnostics (`--dump`)."""
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        active = [
            r for r in requests if r.speech_weight > 0 and r.avatar.has_face[r.avatar.frame_at(r.frame_index)]
        ]
        if not active:
            return np.zeros((0, 8, 32, 32), np.float32), np.zeros((0, 4, 32, 32), np.float32)
        with torch.inference_mode():
            latents = torch.stack(
                [self._avatar_latents(r.avatar)[r.avatar.frame_at(r.frame_index)] for r in active]
            )
            predicted = unet_step(self._models, latents, self._stack_features(active), self._timestep)
            return latents.float().cpu().numpy(), predicted.float().cpu().numpy()

    def synchronize(self) -> None:
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> float:
        """Run UNet + VAE + blend once per batch size (on CUDA: captures graphs, compiles), then once more
        timed (`warm_up_batch_ms`: what the render lane's cost model starts from); returns the ms it all
        took."""
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        started = time.perf_counter()
        timed: dict[int, float] = {}
        with torch.inference_mode():
            for timing in (False, True):
                # Largest first: a compiled graph shared by several buckets tunes its kernels at its first
                # run.
                for size in sorted(batch_sizes, reverse=True):
                    latents = torch.randn((size, 8, 32, 32), device=self._device).to(self._dtype)
                    features = torch.randn((size, 50, 384), device=self._device).to(self._dtype)
                    self.synchronize()
                    tick = time.perf_counter()
                    self._compositor.warm_up(self._faces(latents, features, None))
                    self.synchronize()
                    if timing:
                        timed[size] = (time.perf_counter() - tick) * 1000
                    else:  # a cold compile takes minutes: say how far it got
                        at_s = time.perf_counter() - started
                        progress = {"batch": size, "at_s": round(at_s, 1)}
                        logger.info("warm-up: batch %d ready at %.1f s", size, at_s, extra=progress)
            if self._graphs_on:
                self._windows.warm_up(max(batch_sizes, default=1))
            # A stream pull too: the feature path's kernels load and its caches fill here, not in a session.
            stream = self.open_stream()
            stream.push(np.random.default_rng(0).uniform(-0.1, 0.1, 8 * SAMPLES_PER_FRAME).astype(np.float32))
            stream.pull()
        self.synchronize()
        # The landmark model (~100 MB) loads on a thread: a first avatar need not load it, and readiness does
        # not wait for it (a prepare that starts meanwhile waits on the loader's lock).
        threading.Thread(
            target=load_face_box_models, args=(self._config.prepare,), name="landmark-model-load", daemon=True
        ).start()
        self._warm_up_batch_ms = timed
        return (time.perf_counter() - started) * 1000

    @property
    def warm_up_batch_ms(self) -> dict[int, float]:
        return dict(self._warm_up_batch_ms)

    def artifact_key(self) -> ArtifactKey | None:
        """What this engine's compiled kernels depend on (`realtime.engine.artifacts`); None when nothing is
        compiled (CPU, or compile off)."""
        if not self._compile_on:
            return None
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        try:
            import triton  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

            triton_version = str(triton.__version__)
        except ImportError:
            triton_version = "none"
        accel, cuda = self._accel, True
        settings = {
            "compile_batch1": accel.compile_batch1,
            "compile_channels_last": accel.compile_channels_last,
            "compile_tuned_stages": sorted(accel.compile_tuned_stages),
            "group_norm": accel.group_norm_for(cuda),
            "upsample_conv": accel.upsample_conv_for(cuda),
            "channels_last": accel.channels_last,
            "cuda_graphs": accel.cuda_graphs,
            "decode_from_latent_row": accel.decode_from_latent_row,
        }
        major, minor = torch.cuda.get_device_capability(self._device)
        return ArtifactKey(
            gpu_name=str(torch.cuda.get_device_name(self._device)),
            gpu_capability=f"{major}.{minor}",
            torch_version=str(torch.__version__),
            cuda_version=str(torch.version.cuda),
            triton_version=triton_version,
            model_hash=model_hash(self._models.unet, self._models.vae),
            dtype=self._models.device.dtype_name,
            compile_mode=accel.compile_mode,
            compile_settings=settings_json(settings),
            batch_buckets=accel.batch_buckets,
        )

    def warm_up_prebuilt(
        self,
        artifacts_root: Path | None = None,
        max_frames: int | None = None,
        *,
        rebuild: bool = False,
        warm_up: Callable[[], float] | None = None,
    ) -> PrebuiltWarmUp:
        """`warm_up_buckets` with the prebuilt engine artifacts under `artifacts_root` (default
        `default_artifacts_root()`): the one for this engine's key is loaded before the first compile;
        none, or one refused (another GPU, torch, model or setting: logged with its code), and the warm-up
        compiles from nothing and saves one. `rebuild`: compile and save without looking for one; `warm_up`:
        what compiles (default: `warm_up_buckets(max_frames)`)."""
        key = self.artifact_key()
        if key is None:
            return PrebuiltWarmUp("not_compiled", self.warm_up_buckets(max_frames))
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        def save_blob() -> bytes | None:
            saved = torch.compiler.save_cache_artifacts()
            return None if saved is None else saved[0]

        def cache_misses() -> int:
            from torch._dynamo.utils import counters  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

            return int(counters["inductor"]["fxgraph_cache_miss"])

        return warm_up_with_artifacts(
            artifacts_root or default_artifacts_root(),
            key,
            warm_up=warm_up or (lambda: self.warm_up_buckets(max_frames)),
            load_blob=torch.compiler.load_cache_artifacts,
            save_blob=save_blob,
            cache_misses=cache_misses,
            rebuild=rebuild,
        )

    def warm_up_for_serving(self, artifacts_dir: Path | None = None) -> PrebuiltWarmUp:
        """Every batch bucket, from the prebuilt engine artifacts when they match this engine. With compile,
        graphs and `serve_before_compile`: graphs of the eager modules now (status "deferred"), the compiled
        graphs from a background thread (`serving_state()`, `wait_for_variant`)."""
        if self._compile_on and self._graphs_on and self._accel.serve_before_compile:
            return self._serve_then_compile(artifacts_dir)
        return self.warm_up_prebuilt(artifacts_dir)

    def _serve_then_compile(self, artifacts_dir: Path | None) -> PrebuiltWarmUp:
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        if self._swap is not None:
            raise RuntimeError("the engine already serves: warm_up_for_serving runs once")
        self._set_layer_modes(compiled=False)
        # cuDNN's benchmark times every algorithm of every convolution shape of every bucket: most of an eager
        # warm-up. Its heuristics serve until the compiled graphs (warmed with the benchmark) replace these.
        torch.backends.cudnn.benchmark = False
        self._graph_stages = self._make_stages(compiled=False)
        warm_ms = self.warm_up_buckets()
        swap: VariantSwap[_CompiledVariant] = VariantSwap(EAGER_GRAPHS_VARIANT)
        self._swap = swap
        swap.start(
            COMPILED_VARIANT,
            functools.partial(self._build_compiled, artifacts_dir, self.batch_buckets),
            self._install_compiled,
        )
        return PrebuiltWarmUp("deferred", warm_ms)

    def _build_compiled(self, artifacts_dir: Path | None, buckets: Sequence[int]) -> _CompiledVariant:
        """On the background thread: compile (from the artifact when it matches) and capture the compiled
        graphs of every bucket on a stream of its own, without touching what the render thread replays."""
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        stream = torch.cuda.Stream(self._device)
        stream.wait_stream(torch.cuda.current_stream(self._device))
        timed: dict[int, float] = {}

        def warm() -> float:
            started = time.perf_counter()
            with torch.inference_mode():
                for timing in (False, True):
                    for size in sorted(buckets, reverse=True):  # largest first, as `warm_up`
                        latents = torch.randn((size, 8, 32, 32), device=self._device).to(self._dtype)
                        features = torch.randn((size, 50, 384), device=self._device).to(self._dtype)
                        stream.synchronize()
                        tick = time.perf_counter()
                        stages[1].run(stages[0].run(latents, features))
                        stream.synchronize()
                        if timing:
                            timed[size] = (time.perf_counter() - tick) * 1000
                        else:
                            at_s = time.perf_counter() - started
                            logger.info(
                                "background compile: batch %d ready at %.1f s",
                                size,
                                at_s,
                                extra={"batch": size, "at_s": round(at_s, 1)},
                            )
            return (time.perf_counter() - started) * 1000

        with torch.cuda.stream(stream):
            self._set_layer_modes(compiled=True)
            torch.backends.cudnn.benchmark = self._accel.cudnn_benchmark
            stages = self._make_stages(compiled=True)
            report = self.warm_up_prebuilt(artifacts_dir, warm_up=warm)
            stream.synchronize()
        return _CompiledVariant(stages, timed, report)

    def _install_compiled(self, variant: _CompiledVariant) -> None:
        """Swap the compiled graphs in: the render thread's next batch replays them."""
        current = self._graph_stages
        if current is not None:
            self._retired_stages.append(current)
        self.background_report = variant.report
        self._warm_up_batch_ms = variant.batch_ms
        self._graph_stages = variant.stages

    def serving_state(self) -> ServingState:
        if self._swap is not None:
            return self._swap.state()
        if self._compile_on:
            return ServingState(COMPILED_VARIANT if self._graphs_on else "compiled")
        return ServingState(EAGER_GRAPHS_VARIANT if self._graphs_on else "eager")

    def wait_for_variant(self, timeout_s: float | None = None) -> ServingState:
        """Block until no background build is under way (or `timeout_s` passed); the state then."""
        if self._swap is not None:
            self._swap.wait(timeout_s)
        return self.serving_state()

    def warm_up_buckets(self, max_frames: int | None = None) -> float:
        """`warm_up` of every bucket up to `max_frames` (default: all), so no frame ever waits for a
        capture."""
        if not (self._graphs_on or self._compile_on):
            return self.warm_up((1,))  # eager: nothing is captured or compiled per shape
        limit = max_frames or self._accel.max_bucket
        return self.warm_up([b for b in self._accel.batch_buckets if b <= limit])

    @property
    def batch_buckets(self) -> tuple[int, ...]:
        return self._accel.batch_buckets


def unet_step(
    models: MuseTalkModels, latents: torch.Tensor, features: torch.Tensor, timestep: torch.Tensor
) -> torch.Tensor:
    """MuseTalk's one UNet pass (`timestep` 0): masked + reference face latents `[B, 8, 32, 32]` and whisper
    windows `[B, 50, 384]` -> the generated face's latents `[B, 4, 32, 32]`."""
    out: torch.Tensor = models.unet(latents, timestep, encoder_hidden_states=features).sample
    return out


def decode_faces(models: MuseTalkModels, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode of face latents `[B, 4, rows, 32]` -> faces `[B, 3, 8·rows, 256]` in [0, 1]."""
    decoded: torch.Tensor = models.vae.decode(latents / models.vae_scaling_factor).sample
    return (decoded / 2 + 0.5).clamp(0, 1)


def _channels_last() -> Any:
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    return torch.channels_last


def _skip_batch1(
    marker: Callable[[list[torch.Tensor]], None] | None,
) -> Callable[[list[torch.Tensor]], None] | None:
    if marker is None:
        return None

    def mark(tensors: list[torch.Tensor]) -> None:
        if int(tensors[0].shape[0]) >= 2:
            marker(tensors)

    return mark


EAGER_GRAPHS_VARIANT = "eager-graphs"  # CUDA graphs of the eager modules
COMPILED_VARIANT = "compiled-graphs"  # CUDA graphs of the inductor-compiled functions


class _CompiledVariant:
    """What the background compile hands to the render path."""

    def __init__(
        self, stages: tuple[BucketGraphs, BucketGraphs], batch_ms: dict[int, float], report: PrebuiltWarmUp
    ) -> None:
        self.stages = stages
        self.batch_ms = batch_ms
        self.report = report


class PendingRender:
    """A `render_async` call in flight: `result()` waits for its device work and returns its frames."""

    def __init__(
        self,
        outputs: list[np.ndarray | None],
        pending: list[tuple[list[tuple[int, int]], PendingPaste]],
        collect: Callable[[PendingPaste], list[np.ndarray]],
        timing: tuple[Any, Any] | None = None,
    ) -> None:
        self._outputs = outputs  # bypassed requests' idle frames already in place
        self._pending = pending  # (request index, avatar frame) of each chunk, and its paste in flight
        self._collect = collect
        self._timing = timing  # CUDA events around the device work (None: CPU, or nothing went to the device)
        self._host_ms: float | None = None

    def ready(self) -> bool:
        """The device work is done (`result()` only assembles frames on the host)."""
        return self._timing is None or bool(self._timing[1].query())

    def device_ms(self) -> float | None:
        """The device time from the first enqueued kernel to the last, once ready (None on CPU or before)."""
        if self._timing is None or not self.ready():
            return None
        return float(self._timing[0].elapsed_time(self._timing[1]))

    def host_ms(self) -> float | None:
        """After `result()`: its host time once the device was done (frame assembly); None on CPU or
        before."""
        return self._host_ms if self._timing is not None else None

    def result(self) -> list[np.ndarray]:
        host_s = 0.0
        for part, paste in self._pending:
            if paste.event is not None:  # this chunk's device work and copy (later chunks may still compute)
                paste.event.synchronize()
            assembly_started = time.perf_counter()
            frames = self._collect(paste)
            host_s += time.perf_counter() - assembly_started
            for (index, _), image in zip(part, frames, strict=True):
                self._outputs[index] = image
        if self._pending:
            self._host_ms = host_s * 1000
        self._pending = []
        return [image for image in self._outputs if image is not None]
