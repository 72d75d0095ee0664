"""Rendering on a real face with real speech: frame counts, speech vs silence, batching, preview, CLI."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from infra.cli import main
from realtime.engine import RenderRequest, StageProfile
from realtime.engine.audio.framing import SAMPLES_PER_FRAME
from realtime.engine.avatar.prepared import Avatar
from realtime.engine.errors import RenderRequestInvalid
from realtime.engine.musetalk.engine import MuseTalkEngine
from realtime.engine.offline import OfflineRender, render_clip
from realtime.engine.preview import PreviewEngine
from tests.support.engine_media import astronaut_frames, frames_zip

logger = logging.getLogger(__name__)


def mouth_region(avatar: Avatar, cycle_index: int) -> tuple[slice, slice]:
    """Lower half of the face box: where the mouth is, and what the engine repaints."""
    x1, y1, x2, y2 = (int(v) for v in avatar.crop_boxes[avatar.frame_at(cycle_index)])
    return slice((y1 + y2) // 2, y2), slice(x1, x2)


def outside_crop(frame: np.ndarray, avatar: Avatar, cycle_index: int) -> np.ndarray:
    x1, y1, x2, y2 = (int(v) for v in avatar.crop_boxes[avatar.frame_at(cycle_index)])
    masked = frame.astype(np.int16).copy()
    masked[y1:y2, x1:x2] = -1
    return masked


@pytest.fixture(scope="module")
def speech_silence_speech(speech: np.ndarray) -> np.ndarray:
    """3.0 s: 1.2 s of speech, 1.0 s of digital silence, 0.8 s of speech."""
    second = 16_000
    clip = np.concatenate(
        [speech[: int(1.2 * second)], np.zeros(second, np.float32), speech[int(1.2 * second) : 2 * second]]
    )
    assert len(clip) == 3 * second
    return clip


@pytest.fixture(scope="module")
def musetalk_clip(
    musetalk_engine: MuseTalkEngine, musetalk_avatar: Avatar, speech_silence_speech: np.ndarray
) -> OfflineRender:
    return render_clip(musetalk_engine, musetalk_avatar, speech_silence_speech, batch_size=8)


def test_a_3_second_clip_renders_75_frames(musetalk_clip: OfflineRender, musetalk_avatar: Avatar) -> None:
    assert len(musetalk_clip.frames) == 75
    for frame in musetalk_clip.frames:
        assert frame.dtype == np.uint8 and frame.shape == (
            musetalk_avatar.height_px,
            musetalk_avatar.width_px,
            3,
        )


def test_mouth_moves_during_speech_and_is_the_idle_frame_in_silence(
    musetalk_clip: OfflineRender, musetalk_avatar: Avatar
) -> None:
    avatar = musetalk_avatar
    weights = np.array([f.speech_weight for f in musetalk_clip.features])
    silent = [i for i in range(30, 55) if weights[i] == 0.0]  # inside the 1.2 s .. 2.2 s gap
    speaking = [i for i, w in enumerate(weights) if w == 1.0]
    assert len(silent) >= 15 and len(speaking) >= 25
    for i in silent:  # engine bypassed: the idle frame, bit for bit
        np.testing.assert_array_equal(musetalk_clip.frames[i], avatar.idle_frame(i))
    differences = []
    for i in speaking:
        rows, cols = mouth_region(avatar, i)
        diff = np.abs(musetalk_clip.frames[i][rows, cols].astype(np.int16) - avatar.idle_frame(i)[rows, cols])
        differences.append(float(diff.mean()))
        # Only the crop box is ever touched.
        np.testing.assert_array_equal(
            outside_crop(musetalk_clip.frames[i], avatar, i), outside_crop(avatar.idle_frame(i), avatar, i)
        )
    logger.info("mouth-region mean abs difference from idle during speech: %s", differences)
    assert min(differences) > 5.0


def test_one_batch_may_mix_sessions_and_avatars(
    musetalk_engine: MuseTalkEngine, musetalk_avatar: Avatar, speech: np.ndarray
) -> None:
    other = musetalk_engine.prepare_avatar(frames_zip(astronaut_frames(4)[::-1]))
    features = musetalk_engine.offline_frames(speech[:16_000])
    requests = [
        RenderRequest(musetalk_avatar, 3, features[10].features),
        RenderRequest(other, 5, features[11].features),
        RenderRequest(musetalk_avatar, 17, features[12].features, speech_weight=0.0),
        RenderRequest(other, 2, features[13].features, speech_weight=0.5),
    ]
    profile = StageProfile()
    together = musetalk_engine.render(requests, profile=profile)
    alone = [musetalk_engine.render([r])[0] for r in requests]
    for a, b in zip(together, alone, strict=True):
        assert np.abs(a.astype(np.int16) - b).max() <= 2  # same result batched or not (float rounding)
    np.testing.assert_array_equal(together[2], musetalk_avatar.idle_frame(17))
    assert profile.frames == 4 and profile.ms["unet"] > 0 and profile.ms["vae_decode"] > 0
    # Half weight lands between the idle frame and the full-weight render.
    full = musetalk_engine.render([RenderRequest(other, 2, features[13].features)])[0].astype(np.int16)
    idle = other.idle_frame(2).astype(np.int16)
    rows, cols = mouth_region(other, 2)
    half = together[3].astype(np.int16)
    assert 0.3 < np.abs(half - idle)[rows, cols].mean() / np.abs(full - idle)[rows, cols].mean() < 0.7


def test_streamed_frames_render_like_a_session(
    musetalk_engine: MuseTalkEngine, musetalk_avatar: Avatar, speech: np.ndarray
) -> None:
    stream = musetalk_engine.open_stream()
    rendered = []
    for start in range(0, 16_000, 2_000):
        stream.push(speech[start : start + 2_000])
        ready = stream.pull()
        rendered += musetalk_engine.render(
            [RenderRequest.for_frame(musetalk_avatar, f.index, f) for f in ready]
        )
    stream.end_of_utterance()
    ready = stream.pull()
    rendered += musetalk_engine.render([RenderRequest.for_frame(musetalk_avatar, f.index, f) for f in ready])
    assert len(rendered) == 25


def test_started_renders_return_the_frames_of_render_in_start_order(
    musetalk_engine: MuseTalkEngine, musetalk_avatar: Avatar, speech: np.ndarray
) -> None:
    """`render_async` is `render` split in two: two batches started before either is collected (as the render
    lane
    pipelines them) come back as `render` gives them, each in its own request order."""
    features = musetalk_engine.offline_frames(speech[:16_000])
    first = [RenderRequest.for_frame(musetalk_avatar, k, features[k]) for k in range(4)]
    second = [RenderRequest(musetalk_avatar, 9 - k, features[9 - k].features, 1.0) for k in range(3)]
    second.append(
        RenderRequest(musetalk_avatar, 5, features[5].features, 0.0)
    )  # idle: never reaches the models
    expected = [musetalk_engine.render(first), musetalk_engine.render(second)]
    handles = [musetalk_engine.render_async(first), musetalk_engine.render_async(second)]
    assert all(handle.ready() and handle.device_ms() is None for handle in handles)  # CPU: done once started
    for handle, frames in zip(handles, expected, strict=True):
        got = handle.result()
        assert len(got) == len(frames)
        for image, reference in zip(got, frames, strict=True):
            np.testing.assert_array_equal(image, reference)
    np.testing.assert_array_equal(handles[1].result()[3], musetalk_avatar.idle_frame(5))


def test_features_of_the_other_engine_are_rejected(
    musetalk_engine: MuseTalkEngine,
    musetalk_avatar: Avatar,
    preview_engine: PreviewEngine,
    preview_avatar: Avatar,
) -> None:
    with pytest.raises(RenderRequestInvalid) as excinfo:
        musetalk_engine.render([RenderRequest(musetalk_avatar, 0, np.array([0.5], np.float32))])
    assert excinfo.value.code == "render_request_invalid"
    with pytest.raises(RenderRequestInvalid):
        preview_engine.render([RenderRequest(preview_avatar, 0, np.zeros((50, 384), np.float32))])


def test_preview_mouth_openness_follows_the_audio_level(
    preview_engine: PreviewEngine, preview_avatar: Avatar, speech: np.ndarray
) -> None:
    audio = speech[: 16_000 * 5]
    result = render_clip(preview_engine, preview_avatar, audio)
    measured, levels = [], []
    for i, frame in enumerate(result.frames):
        rows, cols = mouth_region(preview_avatar, i)
        idle = preview_avatar.idle_frame(i)
        measured.append(float(np.abs(frame[rows, cols].astype(np.int16) - idle[rows, cols]).mean()))
        chunk = audio[i * SAMPLES_PER_FRAME : (i + 1) * SAMPLES_PER_FRAME]
        levels.append(float(np.sqrt(np.mean(np.square(chunk)))))
    r = float(np.corrcoef(measured, levels)[0, 1])
    logger.info("preview: correlation of rendered mouth openness with audio RMS r=%.3f", r)
    print(f"preview mouth openness vs audio RMS: r = {r:.3f} over {len(levels)} frames")
    assert r >= 0.8
    assert max(measured) > 3.0  # visibly open at the loudest frames


def test_lipsync_render_writes_an_mp4_with_audio_and_dumps_intermediates(
    tiny_model_dir: Path, tmp_path: Path, speech_silence_speech: np.ndarray, avatar_zip: bytes
) -> None:
    import av
    import soxr

    wav = tmp_path / "speech.wav"
    pcm = (soxr.resample(speech_silence_speech, 16_000, 22_050) * 32767).astype(np.int16)
    with av.open(str(wav), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=22_050, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = 22_050
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    avatar_path = tmp_path / "avatar.zip"
    avatar_path.write_bytes(avatar_zip)
    out, dump = tmp_path / "out.mp4", tmp_path / "dump"
    args = ["render", "--avatar", str(avatar_path), "--audio", str(wav), "--out", str(out)]
    args += ["--engine", "musetalk", "--model-dir", str(tiny_model_dir), "--device", "cpu"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--dump", str(dump)]
    assert main(args) == 0
    with av.open(str(out)) as container:
        assert container.streams.video and container.streams.audio
        video_frames = sum(1 for _ in container.decode(video=0))
    assert video_frames == 75
    features = np.load(dump / "audio_features.npy")
    assert features.shape == (75, 50, 384)
    active = np.load(dump / "active_frames.npy")
    assert np.load(dump / "unet_input_latents.npy").shape == (len(active), 8, 32, 32)
    assert np.load(dump / "unet_output_latents.npy").shape == (len(active), 4, 32, 32)
    assert np.load(dump / "face_boxes.npy").shape == (12, 4)
    assert 20 < len(active) < 75  # the UNet ran for speech frames only


def test_lipsync_render_reports_bad_input_with_a_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_bytes(frames_zip([]))
    wav = tmp_path / "none.wav"
    args = ["render", "--avatar", str(bad), "--audio", str(wav), "--out", str(tmp_path / "o.mp4")]
    assert main([*args, "--engine", "preview", "--cache-dir", str(tmp_path / "c")]) == 1
    assert "[avatar_no_images]" in capsys.readouterr().err
