"""Audio features: MuseTalk's exact offline indexing, the streaming contract, the speech gate."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from realtime.engine.audio.framing import (
    SEGMENT_POSITIONS,
    gather_windows,
    offline_frame_count,
    offline_windows,
    positional_encoding,
    ready_frame_count,
)
from realtime.engine.audio.levels import SpeechGateConfig, speech_weights
from realtime.engine.errors import AudioInvalid
from realtime.engine.musetalk.engine import MuseTalkEngine
from realtime.engine.preview import PreviewEngine

logger = logging.getLogger(__name__)


def upstream_whisper_chunks(hidden_segments: list[np.ndarray], librosa_length: int) -> np.ndarray:
    """A literal transcription of upstream `AudioProcessor.get_whisper_chunk` (fps 25, padding 2/2), numpy."""
    audio_feature_length_per_frame = 2 * (2 + 2 + 1)
    whisper_feature = np.concatenate(hidden_segments, axis=0)[None]  # [1, T, 5, 384]
    whisper_idx_multiplier = 50 / 25
    num_frames = math.floor((librosa_length / 16000) * 25)
    actual_length = math.floor((librosa_length / 16000) * 50)
    whisper_feature = whisper_feature[:, :actual_length, ...]
    padding_nums = math.ceil(whisper_idx_multiplier)
    whisper_feature = np.concatenate(
        [
            np.zeros_like(whisper_feature[:, : padding_nums * 2]),
            whisper_feature,
            np.zeros_like(whisper_feature[:, : padding_nums * 3 * 2]),
        ],
        1,
    )
    prompts = []
    for frame_index in range(num_frames):
        audio_index = math.floor(frame_index * whisper_idx_multiplier)
        clip = whisper_feature[:, audio_index : audio_index + audio_feature_length_per_frame]
        assert clip.shape[1] == audio_feature_length_per_frame
        prompts.append(clip)
    stacked = np.concatenate(prompts, axis=0)  # T, 10, 5, 384
    return stacked.reshape(stacked.shape[0], -1, stacked.shape[-1])  # 'b c h w -> b (c h) w'


# Upstream asserts out below 4 whisper positions (its zero padding is sliced from the features
# themselves); 1 400 samples (4 positions) is the shortest clip it handles.
@pytest.mark.parametrize("n_samples", [48_000, 47_999, 48_321, 16_000 * 31 + 123, 1_400])
def test_offline_indexing_matches_musetalk_on_a_ramp(n_samples: int) -> None:
    # A ramp: hidden state at position p, layer l, channel d = p + l/8 + d/1e4 (every value unique).
    segments = -(-n_samples // (SEGMENT_POSITIONS * 320)) or 1
    positions = np.arange(segments * SEGMENT_POSITIONS, dtype=np.float64)
    ramp = positions[:, None, None] + np.arange(5)[None, :, None] / 8 + np.arange(384)[None, None, :] / 1e4
    segment_list = [ramp[k * SEGMENT_POSITIONS : (k + 1) * SEGMENT_POSITIONS] for k in range(segments)]
    ours = offline_windows(ramp, n_samples)
    theirs = upstream_whisper_chunks(segment_list, n_samples)
    assert ours.shape == theirs.shape == (offline_frame_count(n_samples), 50, 384)
    np.testing.assert_array_equal(ours, theirs)
    if len(ours) > 10:
        # Frame 10's rows: positions 16..25 (2i-4 .. 2i+5), five layers each, position-major.
        assert ours[10, 0, 0] == 16.0 and ours[10, 4, 0] == 16.5 and ours[10, 5, 0] == 17.0
        assert ours[10, 49, 0] == 25.5
    assert np.all(ours[0, :20] == 0.0) or len(ours) == 0  # frame 0's left context is zero padding


def test_offline_frame_count_is_upstreams_floor() -> None:
    assert offline_frame_count(48_000) == 75
    assert offline_frame_count(47_999) == 74
    assert offline_frame_count(639) == 0


def test_positional_encoding_matches_the_upstream_formula() -> None:
    import torch

    d_model, max_len = 384, 50
    pe = torch.zeros(max_len, d_model)
    position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    np.testing.assert_allclose(positional_encoding(), pe.numpy(), atol=1e-5)


def test_streaming_features_match_offline_on_real_speech(
    musetalk_engine: MuseTalkEngine, speech: np.ndarray
) -> None:
    import torch

    audio = speech[: 16_000 * 4]  # 4 s of espeak-ng speech
    offline = torch.stack([f.features for f in musetalk_engine.offline_frames(audio)])
    stream = musetalk_engine.open_stream()
    rng = np.random.default_rng(7)
    position, streamed = 0, []
    while position < len(audio):
        size = int(rng.integers(160, 6000))  # 10 ms .. 375 ms chunks, not frame-aligned
        stream.push(audio[position : position + size])
        position += size
        if stream.ready_frames >= 6:  # pull like a sidecar that batches a few frames
            streamed.extend(stream.pull())
    stream.end_of_utterance()
    streamed.extend(stream.pull())
    assert [f.index for f in streamed] == list(range(len(streamed)))
    assert len(streamed) == -(-len(audio) // 640)  # the partial last frame is padded, not dropped
    ours = torch.stack([f.features for f in streamed])[: len(offline)]
    pe = torch.from_numpy(positional_encoding())

    def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)

    # As the UNet sees them (positional encoding added) and without it (the whisper part alone).
    with_pe, whisper_only = cosine(ours, offline), cosine(ours - pe, offline - pe)
    for name, values in (("with positional encoding", with_pe), ("whisper windows only", whisper_only)):
        per_frame = ", ".join(f"{i}:{c:.5f}" for i, c in enumerate(values.tolist()))
        logger.info("streaming vs offline cosine per frame (%s): %s", name, per_frame)
        print(f"streaming vs offline cosine per frame ({name}): {per_frame}")
        assert float(values[3:-3].min()) >= 0.99, per_frame  # away from the clip edges
    # The comparison discriminates: the same windows five frames apart are far less similar.
    assert float(cosine(ours[5:] - pe, offline[:-5] - pe).mean()) < 0.9


def test_a_frame_is_ready_once_its_right_context_exists(preview_engine: PreviewEngine) -> None:
    stream = preview_engine.open_stream()
    stream.push(np.zeros(1919, np.float32))
    assert stream.ready_frames == 0 and stream.pull() == []
    stream.push(np.zeros(1, np.float32))  # 1920 samples = frame 0 + 80 ms lookahead
    assert stream.ready_frames == 1
    assert [f.index for f in stream.pull()] == [0]
    assert ready_frame_count(640 * 10) == 8


def test_end_of_utterance_pads_and_flushes_then_a_new_utterance_continues_the_timeline(
    preview_engine: PreviewEngine,
) -> None:
    stream = preview_engine.open_stream()
    stream.push(np.full(3000, 0.1, np.float32))
    assert stream.ready_frames == 2
    assert stream.end_of_utterance() == 640 * 5 - 3000  # padded to a whole frame
    stream.push(np.full(1920, 0.1, np.float32))  # next utterance before the flush was pulled
    frames = stream.pull()
    assert [f.index for f in frames] == [0, 1, 2, 3, 4, 5]
    assert [f.utterance for f in frames] == [0] * 5 + [1]
    assert frames[4].padded and not frames[3].padded
    assert frames[5].utterance_frame == 0 and frames[5].start_sample == 5 * 640


def test_reset_drops_unpulled_audio_and_resumes_after_the_last_pulled_frame(
    preview_engine: PreviewEngine,
) -> None:
    stream = preview_engine.open_stream()
    stream.push(np.full(640 * 6 + 100, 0.2, np.float32))
    assert len(stream.pull(max_frames=2)) == 2
    assert stream.pending_samples == 640 * 4 + 100
    assert stream.reset() == 640 * 4 + 100
    assert stream.pending_samples == 0 and stream.ready_frames == 0
    stream.push(np.full(640 * 3, 0.2, np.float32))
    frames = stream.pull()
    assert [f.index for f in frames] == [2] and frames[0].utterance_frame == 0


@pytest.mark.parametrize(
    "chunk",
    [np.zeros(100, np.int16), np.zeros((2, 100), np.float32), np.array([0.0, np.nan], np.float32)],
    ids=["int16", "stereo", "nan"],
)
def test_bad_audio_chunks_are_typed_errors(preview_engine: PreviewEngine, chunk: np.ndarray) -> None:
    stream = preview_engine.open_stream()
    with pytest.raises(AudioInvalid) as excinfo:
        stream.push(chunk)
    assert excinfo.value.code == "audio_invalid"
    stream.push(np.zeros(10, np.float32))  # the stream is unharmed
    assert stream.pending_samples == 10


def test_speech_gate_is_zero_in_silence_one_in_speech_and_ramps_between() -> None:
    levels = np.array([-120.0] * 10 + [-20.0] * 10 + [-120.0] * 12, dtype=np.float32)
    config = SpeechGateConfig(threshold_dbfs=-45, hangover_frames=4, attack_frames=2, release_frames=3)
    weights = speech_weights(levels, config)
    assert np.all(weights[:7] == 0.0)
    np.testing.assert_allclose(weights[8:10], [1 / 3, 2 / 3])  # ramp-in inside the lookahead
    assert np.all(weights[10:23] == 1.0)  # speech + 3 frames of hangover
    np.testing.assert_allclose(weights[23:26], [0.75, 0.5, 0.25])
    assert np.all(weights[26:] == 0.0)


def test_gather_windows_zero_fills_outside_the_audio() -> None:
    hidden = np.ones((20, 5, 384), np.float32)
    windows = gather_windows(hidden, [0, 8], valid_positions=20)
    assert np.all(windows[0, :20] == 0) and np.all(windows[0, 20:] == 1)
    assert np.all(windows[1, :40] == 1) and np.all(windows[1, 40:] == 0)  # positions 20, 21 do not exist


@pytest.mark.parametrize("seconds", [0.0, 0.37, 2.5, 30.0])
def test_device_log_mel_is_the_feature_extractors(musetalk_engine: MuseTalkEngine, seconds: float) -> None:
    """The lane's on-device log-mel (real samples uploaded, padding made there) equals
    WhisperFeatureExtractor's."""
    import torch

    from realtime.engine.musetalk.logmel import DeviceLogMel

    extractor = musetalk_engine.models.feature_extractor
    rng = np.random.default_rng(int(seconds * 100))
    segments = [
        (0.3 * rng.standard_normal(int(seconds * 16_000))).astype(np.float32),
        (0.1 * np.sin(np.arange(16_000 * 3) * 0.05)).astype(
            np.float32
        ),  # a second, different length in the batch
    ]
    expected = extractor(segments, sampling_rate=16_000, return_tensors="np").input_features
    got = DeviceLogMel(extractor, torch.device("cpu"))(segments)
    assert tuple(got.shape) == expected.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    ("start", "count", "valid_positions", "hidden_offset"),
    [(0, 3, 40, 0), (7, 5, 21, 0), (750, 4, 1600, 1500)],
)
def test_device_window_gather_matches_the_reference_indexing(
    musetalk_engine: MuseTalkEngine, start: int, count: int, valid_positions: int, hidden_offset: int
) -> None:
    import torch

    positions = hidden_offset + 1500
    hidden = np.random.default_rng(start).standard_normal((positions, 5, 384)).astype(np.float32)
    frames = range(start, start + count)
    expected = gather_windows(hidden, frames, valid_positions)
    windows = musetalk_engine._windows
    got = windows.gather(torch.from_numpy(hidden[hidden_offset:]), frames, valid_positions, hidden_offset)
    if hidden_offset:  # positions before the offset are not in `hidden`: only frames past it are comparable
        keep = [i for i, f in enumerate(frames) if 2 * f - 4 >= hidden_offset]
        got, expected = got[keep], expected[keep]
    np.testing.assert_array_equal(got.numpy(), expected)
