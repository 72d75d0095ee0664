"""Engine speed-up switches on CPU with the tiny model: buckets, batched stream features, lower-half
decode."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from realtime.engine import EngineConfig, RenderRequest
from realtime.engine.accel import LOWER_DECODE_NOTE, AccelConfig, bucket_for
from realtime.engine.audio.framing import SAMPLES_PER_FRAME
from realtime.engine.avatar.face import lower_face_mask
from realtime.engine.avatar.prepared import Avatar
from realtime.engine.musetalk.engine import MuseTalkEngine


def test_buckets_and_config_are_validated() -> None:
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 3, 5, 8, 9)] == [1, 4, 8, 8, 8]
    with pytest.raises(ValueError, match="strictly increasing"):
        AccelConfig(batch_buckets=(4, 2))
    with pytest.raises(ValueError, match="compile_mode"):
        AccelConfig(compile_mode="fast")
    with pytest.raises(ValueError, match="decode_from_latent_row"):
        AccelConfig(decode_from_latent_row=12)  # would cut into the blend mask (it starts at face row 92)
    with pytest.raises(ValueError, match="group_norm"):
        AccelConfig(group_norm="fused")
    with pytest.raises(
        ValueError, match="compile_tuned_stages may name unet and vae_decode, got \\('vae',\\)"
    ):
        AccelConfig(compile_tuned_stages=("vae",))


def test_group_norms_follow_the_layout_they_are_fast_in() -> None:
    compiled = AccelConfig(compile_mode="default")
    assert compiled.group_norm_for(cuda=True) == "channel_sums"  # channels-last maps under inductor
    assert compiled.group_norm_for(cuda=False) == "native"  # CPU never compiles
    assert AccelConfig().group_norm_for(cuda=True) == "native"  # graphs only: eager kernels, NCHW
    assert (
        AccelConfig(compile_mode="default", compile_channels_last=False).group_norm_for(cuda=True) == "native"
    )
    assert AccelConfig(group_norm="channel_sums").group_norm_for(cuda=False) == "channel_sums"
    assert compiled.upsample_conv_for(cuda=True) == "transpose"  # no phase interleave over channels-last maps
    assert AccelConfig().upsample_conv_for(cuda=True) == "phases"
    assert compiled.upsample_conv_for(cuda=False) == "nearest"
    # The eager graphs served while the compiled ones are built use the eager path's forms.
    assert compiled.group_norm_for(cuda=True, compiled=False) == "native"
    assert compiled.upsample_conv_for(cuda=True, compiled=False) == "phases"
    assert compiled.upsample_conv_for(cuda=True, compiled=True) == "transpose"


def test_compile_options_spell_out_the_mode_and_the_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from realtime.engine.accel import compile_fn

    seen: list[Any] = []

    def fake_compile(fn: Any, options: Any = None) -> Any:
        seen.append(options)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    compile_fn(print, "default")
    compile_fn(print, "default", channels_last=True)
    compile_fn(print, "max-autotune-no-cudagraphs", channels_last=True)
    assert seen[0] is None
    assert seen[1] == {"force_layout_optimization": True}
    assert (
        seen[2]["force_layout_optimization"]
        and seen[2]["max_autotune"]
        and "triton.cudagraphs" not in seen[2]
    )


def test_streams_prefetched_in_one_batched_encode_give_the_features_of_separate_encodes(
    musetalk_engine: MuseTalkEngine, speech: np.ndarray
) -> None:
    """The render lane encodes every stream of a batch at once (`prefetch_features`); the pulls then hit the
    cache
    and return what each stream would have computed alone."""
    clips = [speech[: 40 * SAMPLES_PER_FRAME], speech[SAMPLES_PER_FRAME * 7 : SAMPLES_PER_FRAME * 30]]
    alone, batched = (
        [musetalk_engine.open_stream() for _ in clips],
        [musetalk_engine.open_stream() for _ in clips],
    )
    for streams in (alone, batched):
        for stream, clip in zip(streams, clips, strict=True):
            stream.push(clip)
    expected = [stream.pull(5) for stream in alone]
    windows = musetalk_engine._windows
    original = windows.encode_segments
    calls: list[int] = []

    def counting(segments: list[np.ndarray]) -> Any:
        calls.append(len(segments))
        return original(segments)

    windows.encode_segments = counting  # type: ignore[method-assign]
    try:
        assert musetalk_engine.prefetch_features(batched, [5, 5]) == 2
        got = [stream.pull(5) for stream in batched]
    finally:
        windows.encode_segments = original  # type: ignore[method-assign]
    assert calls == [2]  # one encoder call for both streams; the pulls encoded nothing more
    for want_frames, got_frames in zip(expected, got, strict=True):
        assert [f.index for f in got_frames] == [f.index for f in want_frames]
        for want, have in zip(want_frames, got_frames, strict=True):
            np.testing.assert_allclose(have.features.numpy(), want.features.numpy(), rtol=0, atol=1e-4)
            assert have.speech_weight == want.speech_weight


def _blended_difference(
    musetalk_engine: MuseTalkEngine, musetalk_avatar: Avatar, speech: np.ndarray
) -> tuple[float, float]:
    """(max |lower - full| grey levels where the pasted mask is > 0, max where it is 0), over speaking
    frames."""
    lower = MuseTalkEngine(
        musetalk_engine.models,
        EngineConfig(engine="musetalk", device="cpu", accel=AccelConfig(decode_from_latent_row=10)),
    )
    frames = musetalk_engine.offline_frames(speech[: 16_000 * 2])[10:22]
    requests = [RenderRequest(musetalk_avatar, 3 + k, f.features, 1.0) for k, f in enumerate(frames)]
    full_out, lower_out = musetalk_engine.render(requests), lower.render(requests)
    inside, outside = 0.0, 0.0
    import cv2

    mask = lower_face_mask()
    for request, a, b in zip(requests, full_out, lower_out, strict=True):
        frame = musetalk_avatar.frame_at(request.frame_index)
        x1, y1, x2, y2 = (int(v) for v in musetalk_avatar.crop_boxes[frame])
        box_mask = cv2.resize(mask, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
        frame_mask = np.zeros(a.shape[:2], np.float32)
        frame_mask[y1:y2, x1:x2] = box_mask
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2)
        inside = max(inside, float(diff[frame_mask > 1e-3].max()))
        outside = max(outside, float(diff[frame_mask == 0].max()))
    return inside, outside


def test_lower_half_decode_leaves_everything_outside_the_mask_untouched(
    musetalk_engine: MuseTalkEngine, musetalk_avatar: Avatar, speech: np.ndarray
) -> None:
    _, outside = _blended_difference(musetalk_engine, musetalk_avatar, speech)
    assert outside <= 1.0  # 1: the mask's bilinear edge; the idle frame is pasted back exactly elsewhere


@pytest.mark.xfail(
    strict=True,
    reason="the cropped decode's GroupNorm statistics differ from the full face's (see LOWER_DECODE_NOTE): "
    "tens of grey levels on random weights; kept as the bound real weights must meet before it is "
    "switched on",
)
def test_lower_half_decode_is_within_one_grey_level_inside_the_mask(
    musetalk_engine: MuseTalkEngine, musetalk_avatar: Avatar, speech: np.ndarray
) -> None:
    assert "GroupNorm" in LOWER_DECODE_NOTE
    inside, _ = _blended_difference(musetalk_engine, musetalk_avatar, speech)
    assert inside < 1.0


def test_warm_up_times_each_batch_size_for_the_render_lane(musetalk_engine: MuseTalkEngine) -> None:
    musetalk_engine.warm_up((1, 2))
    timed = musetalk_engine.warm_up_batch_ms
    assert set(timed) == {1, 2} and all(ms > 0 for ms in timed.values())


def test_a_cpu_engine_serves_its_only_variant_with_nothing_building(musetalk_engine: MuseTalkEngine) -> None:
    # No graphs and no compile on CPU: nothing is deferred to a background build, and waiting returns at once.
    state = musetalk_engine.wait_for_variant(0.0)
    assert (state.variant, state.building, state.error) == ("eager", "", "")
    assert musetalk_engine.background_report is None
