"""PCM ingest: formats, decoding, resampling and the WS text protocol — every bad input has a typed error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from realtime.ingest.decoder import decode_pcm
from realtime.ingest.errors import IngestError, IngestErrorCode
from realtime.ingest.formats import PcmEncoding, PcmFormat
from realtime.ingest.protocol import ConfigMessage, EndOfUtterance, Interrupt, StatsRequest, parse_client_text
from realtime.ingest.resample import AudioConverter


def _code(exc: pytest.ExceptionInfo[IngestError]) -> str:
    return str(exc.value.code)


# ---- formats --------------------------------------------------------------------------------


def test_default_format_is_s16le_mono_16k() -> None:
    fmt = PcmFormat()
    assert (fmt.sample_rate_hz, fmt.encoding, fmt.channels, fmt.bytes_per_frame) == (
        16_000,
        PcmEncoding.S16LE,
        1,
        2,
    )


def test_format_from_query_strings_and_aliases() -> None:
    fmt = PcmFormat.from_mapping({"sample_rate": "48000", "encoding": "pcm_f32le", "channels": "2"})
    assert fmt == PcmFormat(48_000, PcmEncoding.F32LE, 2)
    assert fmt.bytes_per_frame == 8
    assert fmt.to_timeline_samples(4800) == 1600


def test_config_keeps_unspecified_fields_of_the_base() -> None:
    base = PcmFormat(24_000, PcmEncoding.S16LE, 1)
    assert PcmFormat.from_mapping({"channels": 2}, base=base) == PcmFormat(24_000, PcmEncoding.S16LE, 2)


@pytest.mark.parametrize(
    ("values", "code"),
    [
        ({"encoding": "mp3"}, "unknown_encoding"),
        ({"encoding": 5}, "unknown_encoding"),
        ({"sample_rate": "fast"}, "bad_config"),
        ({"sample_rate": "16000²"}, "bad_config"),
        ({"channels": "\u0661"}, "bad_config"),
        ({"sample_rate": 4000}, "bad_config"),
        ({"sample_rate": 400_000}, "bad_config"),
        ({"sample_rate": -16000}, "bad_config"),
        ({"sample_rate": True}, "bad_config"),
        ({"sample_rate": 16000.5}, "bad_config"),
        ({"channels": 0}, "bad_config"),
        ({"channels": 9}, "bad_config"),
        ({"bitrate": 1}, "bad_config"),
        ({"sample_rate": 16000, "sample_rate_hz": 16000}, "bad_config"),
    ],
)
def test_bad_config_values_are_fatal_typed_errors(values: dict[str, object], code: str) -> None:
    with pytest.raises(IngestError) as exc:
        PcmFormat.from_mapping(values)
    assert _code(exc) == code
    assert exc.value.fatal
    assert exc.value.message


# ---- decoding -------------------------------------------------------------------------------


def test_decode_s16le_mono_scales_to_unit_range() -> None:
    samples = np.array([0, 16384, -32768, 32767], dtype="<i2")
    mono, clipped = decode_pcm(samples.tobytes(), PcmFormat())
    assert mono.dtype == np.float32
    np.testing.assert_allclose(mono, [0.0, 0.5, -1.0, 32767 / 32768])
    assert clipped == 0


def test_decode_f32le_stereo_downmixes() -> None:
    interleaved = np.array([0.5, -0.5, 1.0, 0.0], dtype="<f4")
    mono, _ = decode_pcm(interleaved.tobytes(), PcmFormat(48_000, PcmEncoding.F32LE, 2))
    np.testing.assert_allclose(mono, [0.0, 0.5])


def test_odd_byte_count_is_rejected_with_its_samples_counted() -> None:
    with pytest.raises(IngestError) as exc:
        decode_pcm(b"\x00" * 641, PcmFormat())
    assert _code(exc) == "misaligned_pcm"
    assert exc.value.rejected_samples == 320
    assert not exc.value.fatal
    assert "641 bytes" in exc.value.message


def test_stereo_message_must_hold_whole_frames() -> None:
    with pytest.raises(IngestError) as exc:
        decode_pcm(b"\x00" * 6, PcmFormat(channels=2))  # 1.5 stereo s16 frames
    assert _code(exc) == "misaligned_pcm"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_floats_are_rejected(bad: float) -> None:
    payload = np.array([0.1, bad, 0.2, 0.3], dtype="<f4").tobytes()
    with pytest.raises(IngestError) as exc:
        decode_pcm(payload, PcmFormat(encoding=PcmEncoding.F32LE))
    assert _code(exc) == "non_finite_samples"
    assert exc.value.rejected_samples == 4


def test_int16_scaled_floats_are_rejected_and_overshoot_is_clipped_and_counted() -> None:
    fmt = PcmFormat(encoding=PcmEncoding.F32LE)
    with pytest.raises(IngestError) as exc:
        decode_pcm(np.array([1200.0, -3000.0], dtype="<f4").tobytes(), fmt)
    assert _code(exc) == "samples_out_of_range"
    mono, clipped = decode_pcm(np.array([1.2, -0.5, -1.01], dtype="<f4").tobytes(), fmt)
    assert clipped == 2
    np.testing.assert_allclose(mono, [1.0, -0.5, -1.0])


def test_empty_message_is_no_audio() -> None:
    mono, clipped = decode_pcm(b"", PcmFormat())
    assert mono.size == 0 and clipped == 0


# ---- resampling -----------------------------------------------------------------------------


def test_16k_input_passes_through_the_timeline_exactly() -> None:
    converter = AudioConverter(PcmFormat())
    samples = (np.sin(np.arange(1600) / 5) * 10000).astype("<i2")
    out = converter.push(samples.tobytes())
    np.testing.assert_allclose(out.timeline, samples / 32768.0)
    tail = converter.flush()
    assert len(out.playout) + len(tail.playout) == 3 * 1600


@pytest.mark.parametrize("rate", [8_000, 22_050, 24_000, 44_100, 48_000])
def test_any_rate_lands_on_both_timelines_with_the_right_length(rate: int) -> None:
    converter = AudioConverter(PcmFormat(sample_rate_hz=rate, encoding=PcmEncoding.F32LE))
    n = rate  # one second, in uneven chunks
    signal = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / rate)).astype("<f4")
    timeline, playout = [], []
    for start in range(0, n, 997):
        out = converter.push(signal[start : start + 997].tobytes())
        timeline.append(out.timeline)
        playout.append(out.playout)
    held = converter.held_timeline_samples()  # what an interrupt now would account as flushed
    tail = converter.flush()
    assert len(tail.timeline) == held
    total_timeline = sum(len(x) for x in timeline) + len(tail.timeline)
    total_playout = sum(len(x) for x in playout) + len(tail.playout)
    assert total_timeline == 16_000
    assert total_playout == 48_000
    # The tone survives: 440 Hz at the right level, at the 16 kHz rate.
    joined = np.concatenate([*timeline, tail.timeline])
    spectrum = np.abs(np.fft.rfft(joined[2000:14000]))
    peak_hz = np.argmax(spectrum) * 16_000 / 12_000
    assert abs(peak_hz - 440) < 3
    assert 0.25 < np.abs(joined[2000:14000]).max() < 0.35


def test_reset_reports_what_the_resampler_held() -> None:
    converter = AudioConverter(PcmFormat(sample_rate_hz=48_000))
    out = converter.push(np.zeros(4800, dtype="<i2").tobytes())
    held = converter.held_timeline_samples()
    assert held > 0 and len(out.timeline) + held == 1600
    assert converter.reset() == held
    assert not converter.holding


# ---- text protocol --------------------------------------------------------------------------


def test_control_messages_parse() -> None:
    fmt = PcmFormat()
    assert isinstance(parse_client_text('{"type":"end_of_utterance"}', fmt), EndOfUtterance)
    assert isinstance(parse_client_text('{"type":"interrupt"}', fmt), Interrupt)
    assert isinstance(parse_client_text('{"type":"stats"}', fmt), StatsRequest)
    config = parse_client_text(json.dumps({"type": "config", "sample_rate": 48000, "encoding": "f32le"}), fmt)
    assert isinstance(config, ConfigMessage)
    assert config.pcm_format == PcmFormat(48_000, PcmEncoding.F32LE, 1)


@pytest.mark.parametrize(
    ("text", "code", "fatal"),
    [
        ("{not json", "bad_json", False),
        ("[1, 2]", "bad_json", False),
        ('"interrupt"', "bad_json", False),
        ('{"type":"interrupt","now":true}', "bad_json", False),
        ('{"type":"dance"}', "unknown_message_type", False),
        ('{"kind":"interrupt"}', "unknown_message_type", False),
        ('{"type":"config","encoding":"opus"}', "unknown_encoding", True),
        ('{"type":"config","sample_rate":"x"}', "bad_config", True),
        ('{"type":"config","sample_rate":"\u00b2"}', "bad_config", True),
        ('{"type":"config","volume":2}', "bad_config", True),
        (json.dumps({"type": "stats", "pad": "x" * 70_000}), "message_too_large", False),
    ],
)
def test_bad_text_messages(text: str, code: str, fatal: bool) -> None:
    with pytest.raises(IngestError) as exc:
        parse_client_text(text, PcmFormat())
    assert _code(exc) == code
    assert exc.value.fatal is fatal
    message = exc.value.to_message()
    assert message["type"] == "error" and message["code"] == code and message["message"]


def test_error_codes_are_stable_strings() -> None:
    assert {c.value for c in IngestErrorCode} >= {
        "misaligned_pcm",
        "non_finite_samples",
        "unknown_encoding",
        "bad_config",
        "message_too_large",
        "buffer_full",
        "bad_json",
    }
