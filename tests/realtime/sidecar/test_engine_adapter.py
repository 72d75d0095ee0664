"""The engine adapter's lane-side feature work: one batched whisper encode per lane batch, none per job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from realtime.engine.protocol import EngineConfig
from realtime.host import AvatarAsset
from realtime.sidecar.engine_adapter import EngineAdapter
from tests.support.engine_media import astronaut_frames, frames_zip


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> EngineAdapter:
    from realtime.engine.musetalk.weights.random import write_checkpoint

    root = tmp_path_factory.mktemp("adapter")
    write_checkpoint(root / "models", "tiny")
    return EngineAdapter(
        EngineConfig(engine="musetalk", model_dir=root / "models", device="cpu", cache_dir=root)
    )


def test_audio_arriving_after_the_batched_encode_waits_for_the_next_batch(
    adapter: EngineAdapter, tmp_path: Path
) -> None:
    """Regression: the jobs' pulls re-applied audio that came in after `prepare_features`, so each pull
    re-encoded
    its 30 s segment alone (at 8 sessions on an H200 that doubled the lane's batch time)."""
    avatar_zip = tmp_path / "avatar.zip"
    avatar_zip.write_bytes(frames_zip(astronaut_frames()[:4]))
    _, avatar = adapter.prepare_avatar(AvatarAsset(avatar_zip, "frames_zip", ""), lambda _progress: None)
    utterance: Any = adapter.open_session(avatar).open_utterance()
    windows = adapter.engine._windows  # type: ignore[attr-defined]
    original = windows.encode_segments
    encodes: list[int] = []

    def counting(segments: list[np.ndarray]) -> Any:
        encodes.append(len(segments))
        return original(segments)

    windows.encode_segments = counting
    try:
        speech = (0.2 * np.sin(np.arange(16_000 * 2) * 0.03)).astype(np.float32)
        utterance.push_audio(speech[:16_000])  # 1 s: 22 frames ready
        assert adapter.prepare_features([(utterance, 10)]) == 1
        assert encodes == [1]
        utterance.push_audio(speech[16_000:24_000])  # arrives while the lane batch is being formed
        first = utterance.render_requests(list(range(10)), list(range(10)))
        assert len(first) == 10 and encodes == [1]  # the pull used the batched encode: no encode of its own
        # The late audio is applied by the next batch's encode, and its frames are pulled without another one.
        assert adapter.prepare_features([(utterance, 20)]) == 1
        assert encodes == [1, 1]
        second = utterance.render_requests(list(range(10, 30)), list(range(10, 30)))
        assert len(second) == 20 and encodes == [1, 1]
        # Frames beyond what the encoded audio made ready: the pull applies its inbox and encodes (correct,
        # unbatched).
        utterance.push_audio(speech[24_000:])
        third = utterance.render_requests(list(range(30, 40)), list(range(30, 40)))
        assert len(third) == 10 and encodes == [1, 1, 1]
    finally:
        windows.encode_segments = original


def test_jobs_of_a_closed_utterance_encode_nothing_and_say_so(adapter: EngineAdapter, tmp_path: Path) -> None:
    """Under load an utterance can finish playing (its stream closed) while jobs for its last frames still
    wait in
    the lane. Before, those jobs pulled from the emptied stream and failed as render errors ("asked for 3
    frames, the feature stream had 1 ready"), counted against the session."""
    from realtime.sidecar.engine_port import UtteranceClosed

    avatar_zip = tmp_path / "avatar.zip"
    avatar_zip.write_bytes(frames_zip(astronaut_frames()[:4]))
    _, avatar = adapter.prepare_avatar(AvatarAsset(avatar_zip, "frames_zip", ""), lambda _progress: None)
    utterance: Any = adapter.open_session(avatar).open_utterance()
    utterance.push_audio((0.2 * np.sin(np.arange(16_000) * 0.03)).astype(np.float32))
    utterance.end()
    assert len(utterance.render_requests([0, 1], [0, 1])) == 2
    utterance.close()
    assert adapter.prepare_features([(utterance, 3)]) == 0  # nothing encoded for it
    with pytest.raises(UtteranceClosed):
        utterance.render_requests([2, 3, 4], [2, 3, 4])


def test_a_job_that_overtakes_an_earlier_one_loses_only_the_earlier_frames(
    adapter: EngineAdapter, tmp_path: Path
) -> None:
    """Regression (H200, 512² sessions): a job of frames 4.. ran before the job of frames 0..3 of its stream;
    every later job of the utterance then failed ("frames must be pulled in order: expected 4, got 6", ... 74)
    and the whole utterance was lost. Now the frames passed over are the only ones lost, and each later frame
    keeps its own audio's features."""
    from realtime.sidecar.engine_port import FramesOutOfOrder

    avatar_zip = tmp_path / "avatar.zip"
    avatar_zip.write_bytes(frames_zip(astronaut_frames()[:4]))
    _, avatar = adapter.prepare_avatar(AvatarAsset(avatar_zip, "frames_zip", ""), lambda _progress: None)
    session = adapter.open_session(avatar)
    speech = (0.2 * np.sin(np.arange(16_000) * 0.03) * np.linspace(0, 1, 16_000)).astype(np.float32)
    reference: Any = session.open_utterance()
    reference.push_audio(speech)
    reference.end()
    expected = reference.render_requests(list(range(12)), list(range(12)))

    utterance: Any = session.open_utterance()
    utterance.push_audio(speech)
    utterance.end()
    ahead = utterance.render_requests([4, 5], [4, 5])  # overtook frames 0..3
    assert [r.frame_index for r in ahead] == [4, 5]
    for got, want in zip(ahead, expected[4:6], strict=True):
        np.testing.assert_array_equal(got.features, want.features)  # aligned with its own audio
    with pytest.raises(FramesOutOfOrder):
        utterance.render_requests([0, 1, 2, 3], [0, 1, 2, 3])
    after = utterance.render_requests([6, 7, 8], [6, 7, 8])  # the stream goes on
    for got, want in zip(after, expected[6:9], strict=True):
        np.testing.assert_array_equal(got.features, want.features)


def test_sidecar_flags_reach_the_engine_and_the_render_lane() -> None:
    import argparse

    from infra.cli.sidecar import add_sidecar_arguments, settings_from_args
    from realtime.sidecar.process import build_host

    parser = argparse.ArgumentParser()
    add_sidecar_arguments(parser)
    defaults = settings_from_args(parser.parse_args([]))
    assert (defaults.compile_mode, defaults.cuda_graphs, defaults.host.max_batch_frames) == ("off", True, 64)
    args = parser.parse_args(
        ["--compile", "default", "--no-cuda-graphs", "--max-batch-frames", "32", "--engine", "preview"]
    )
    host = build_host(settings_from_args(args))
    config = host.engine.config  # type: ignore[attr-defined]
    assert config.accel.compile_mode == "default" and not config.accel.cuda_graphs
    assert config.accel.compile_tuned_stages == ("vae_decode",)
    assert config.max_batch_size == 32 and host.lane.max_batch_frames == 32
    host.lane.close()
    untuned = build_host(
        settings_from_args(parser.parse_args(["--compile", "default", "--no-kernel-tuning"]))
    )
    assert untuned.engine.config.accel.compile_tuned_stages == ()  # type: ignore[attr-defined]
    with pytest.raises(SystemExit):
        parser.parse_args(["--compile", "fast"])
    assert settings_from_args(parser.parse_args(["--speech-duty", "0.5"])).host.speech_duty == 0.5
    for bad in ("0", "1.5", "-1"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--speech-duty", bad])
    for bad in ("0", "-4", "many"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--max-batch-frames", bad])


def test_the_status_names_the_variant_that_serves_once_warm(tmp_path: Path) -> None:
    adapter = EngineAdapter(EngineConfig(engine="preview", cache_dir=tmp_path))
    assert adapter.info().serving == ""  # not loaded yet
    adapter.warm_up()
    status = adapter.info()
    assert status.warm and status.serving == "serving default"  # one variant, nothing built in the background
