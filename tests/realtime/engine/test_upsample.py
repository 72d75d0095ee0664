"""The fused upsample convolutions are the same function as diffusers' nearest-2x + 3x3 conv layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.upsampling import Upsample2D

from realtime.engine import EngineConfig, RenderRequest
from realtime.engine.accel import AccelConfig
from realtime.engine.avatar.prepared import Avatar
from realtime.engine.musetalk.engine import MuseTalkEngine
from realtime.engine.upsample import set_upsample_conv_mode


@pytest.mark.parametrize("mode", ["transpose", "phases"])
@pytest.mark.parametrize(("height", "width", "bias"), [(5, 7, True), (1, 1, True), (8, 8, False)])
def test_fused_forms_match_nearest_upsample_then_conv(mode: str, height: int, width: int, bias: bool) -> None:
    torch.manual_seed(height * 31 + width)
    root = torch.nn.Sequential(Upsample2D(6, use_conv=True, out_channels=5, bias=bias))
    hidden = torch.randn(3, 6, height, width, dtype=torch.float64)
    root.to(torch.float64)
    expected = root(hidden)
    assert set_upsample_conv_mode(root, mode) == 1  # type: ignore[arg-type]
    fused = root(hidden)
    assert fused.shape == expected.shape == (3, 5, 2 * height, 2 * width)
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-12)


def test_mode_switches_back_and_only_plain_layers_are_wrapped() -> None:
    plain = Upsample2D(4, use_conv=True)
    no_conv = Upsample2D(4, use_conv=False)  # nothing to fuse
    transposed = Upsample2D(4, use_conv_transpose=True)  # already a transposed conv
    root = torch.nn.Sequential(plain, no_conv, transposed)
    hidden = torch.randn(2, 4, 6, 6)
    expected = [module(hidden) for module in (plain, no_conv, transposed)]
    assert set_upsample_conv_mode(root, "transpose") == 1
    assert set_upsample_conv_mode(root, "transpose") == 1  # idempotent: the wrapper is not wrapped again
    assert type(root[0]).__name__ == "FusedUpsampleConv" and root[1] is no_conv and root[2] is transposed
    # An explicit output size other than 2x (the UNet's odd-size path) falls back to the original layer.
    odd = root[0](hidden, output_size=(13, 12))
    torch.testing.assert_close(odd, plain(hidden, output_size=(13, 12)))
    assert set_upsample_conv_mode(root, "nearest") == 1
    for module, want in zip(root, expected, strict=True):
        torch.testing.assert_close(module(hidden), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="upsample conv mode"):
        set_upsample_conv_mode(root, "bilinear")  # type: ignore[arg-type]


def test_rendered_frames_are_unchanged_by_the_fused_upsampling(
    musetalk_engine: MuseTalkEngine, musetalk_avatar: Avatar, speech: np.ndarray
) -> None:
    """Whole engine on the tiny checkpoint: composited frames equal the nearest form's to < 1 grey level."""
    frames = musetalk_engine.offline_frames(speech[: 16_000 * 2])[10:18]
    requests = [RenderRequest(musetalk_avatar, 3 + k, f.features, 1.0) for k, f in enumerate(frames)]
    models = musetalk_engine.models
    try:
        outputs = {}
        for mode in ("nearest", "transpose", "phases"):
            engine = MuseTalkEngine(
                models, EngineConfig(engine="musetalk", device="cpu", accel=AccelConfig(upsample_conv=mode))
            )
            outputs[mode] = engine.render(requests)
        wrapped = [
            m
            for m in (*models.unet.modules(), *models.vae.modules())
            if type(m).__name__ == "FusedUpsampleConv"
        ]
        assert len(wrapped) >= 2  # the UNet's and the decoder's upsamplers are both covered
    finally:
        set_upsample_conv_mode(models.unet, "nearest")  # the fixture's models are shared: leave them as found
        set_upsample_conv_mode(models.vae, "nearest")
    for mode in ("transpose", "phases"):
        for want, got in zip(outputs["nearest"], outputs[mode], strict=True):
            assert np.abs(want.astype(np.int16) - got.astype(np.int16)).max() <= 1  # rounding at .5 only
