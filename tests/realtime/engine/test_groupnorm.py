"""GroupNorm from per-channel sums equals F.group_norm, in either memory layout and inside the models."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from realtime.engine.groupnorm import channel_sum_group_norm, set_group_norm_mode


@pytest.mark.parametrize("shape", [(3, 64, 17, 9), (2, 32, 40), (1, 128, 8, 8)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_sums_equal_group_norm(shape: tuple[int, ...], channels_last: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 3.0 + 5.0  # a mean far from 0
    x[:, : shape[1] // 2] *= 0.1  # groups of very different spreads
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(shape[1], generator=generator, dtype=torch.float64)
    bias = torch.randn(shape[1], generator=generator, dtype=torch.float64)
    x32, w32, b32 = x.float(), weight.float(), bias.float()
    expected = F.group_norm(x, 32, weight, bias, 1e-6)
    torch.testing.assert_close(
        channel_sum_group_norm(x32, 32, w32, b32, 1e-6).double(), expected, atol=2e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        channel_sum_group_norm(x32, 32, None, None, 1e-6).double(),
        F.group_norm(x, 32, eps=1e-6),
        atol=2e-5,
        rtol=1e-5,
    )


def test_half_inputs_come_back_half() -> None:
    x = torch.randn(2, 64, 8, 8).half()
    out = channel_sum_group_norm(x, 32, None, None, 1e-5)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), F.group_norm(x.float(), 32, eps=1e-5), atol=2e-3, rtol=1e-3)


def test_the_tiny_models_give_the_same_output_and_switch_back() -> None:
    from realtime.engine.musetalk.weights.random import build_modules

    unet, vae, _ = build_modules("tiny", seed=1)
    unet.eval(), vae.eval()
    latents = torch.randn(2, 8, 32, 32)
    features = torch.randn(2, 50, 384)
    timestep = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        predicted = unet(latents, timestep, encoder_hidden_states=features).sample
        decoded = vae.decode(predicted).sample
        swapped = set_group_norm_mode(unet, "channel_sums") + set_group_norm_mode(vae, "channel_sums")
        assert swapped > 0
        predicted_sums = unet(latents, timestep, encoder_hidden_states=features).sample
        decoded_sums = vae.decode(predicted_sums).sample
        assert set_group_norm_mode(vae, "native") == set_group_norm_mode(vae, "native")  # idempotent
        set_group_norm_mode(unet, "native")
        back = vae.decode(unet(latents, timestep, encoder_hidden_states=features).sample).sample
    torch.testing.assert_close(predicted_sums, predicted, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decoded_sums, decoded, atol=1e-4, rtol=1e-4)
    assert torch.equal(back, decoded)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="group norm mode"):
        set_group_norm_mode(torch.nn.Sequential(), "fast")  # type: ignore[arg-type]


def test_an_engine_with_channel_sum_norms_renders_the_same_frames_and_leaves_the_encoder_alone(
    musetalk_engine: Any, musetalk_avatar: Any, speech: Any
) -> None:
    """Whole engine on the tiny checkpoint: only the compiled render path (UNet, VAE decoder) is switched; the
    encoder (avatar preparation, eager) keeps torch's own group norm, the faster one there."""
    import numpy as np

    from realtime.engine import EngineConfig, RenderRequest
    from realtime.engine.accel import AccelConfig
    from realtime.engine.musetalk.engine import MuseTalkEngine

    frames = musetalk_engine.offline_frames(speech[: 16_000 * 2])[10:16]
    requests = [RenderRequest(musetalk_avatar, 3 + k, f.features, 1.0) for k, f in enumerate(frames)]
    models = musetalk_engine.models
    outputs = {}
    try:
        for mode in ("native", "channel_sums"):
            engine = MuseTalkEngine(
                models, EngineConfig(engine="musetalk", device="cpu", accel=AccelConfig(group_norm=mode))
            )
            outputs[mode] = engine.render(requests)

        def wrapped(module: torch.nn.Module) -> int:
            return sum(type(m).__name__ == "ChannelSumGroupNorm" for m in module.modules())

        assert wrapped(models.unet) > 0 and wrapped(models.vae.decoder) > 0
        assert wrapped(models.vae.encoder) == 0
    finally:
        set_group_norm_mode(models.unet, "native")  # the fixture's models are shared: leave them as found
        set_group_norm_mode(models.vae, "native")
    for want, got in zip(outputs["native"], outputs["channel_sums"], strict=True):
        assert np.abs(want.astype(np.int16) - got.astype(np.int16)).max() <= 1  # rounding at .5 only
