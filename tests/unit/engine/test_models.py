"""Model files: the tiny checkpoint loads through the real loader; every broken layout is a typed error."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from infra.cli import main
from realtime.engine import EngineConfig, create_engine
from realtime.engine.device import choose_device
from realtime.engine.errors import ModelConfigInvalid, ModelFileCorrupt, ModelFilesMissing, ModelWeightsMismatch
from realtime.engine.weights.layout import ModelLayout, check_model_dir
from realtime.engine.weights.loader import load_musetalk


@pytest.fixture()
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(tiny_model_dir, target)
    return target


def test_tiny_checkpoint_uses_the_upstream_layout_and_file_formats(tiny_model_dir: Path) -> None:
    layout = ModelLayout(tiny_model_dir)
    for role, path in layout.required_files():
        assert path.is_file(), role
    # torch.save archives (what upstream ships as unet.pth / *.bin), diffusers/transformers JSON configs.
    for path in (layout.unet_weights, layout.vae_weights(), layout.whisper_weights()):
        assert zipfile.is_zipfile(path)
    assert layout.vae_weights().name == "diffusion_pytorch_model.bin"
    assert layout.whisper_weights().name == "pytorch_model.bin"
    config = json.loads(layout.unet_config.read_text())
    assert (config["in_channels"], config["out_channels"], config["cross_attention_dim"]) == (8, 4, 384)
    assert check_model_dir(tiny_model_dir).ok


def test_tiny_checkpoint_loads_strictly_and_keeps_the_musetalk_shapes(tiny_model_dir: Path) -> None:
    import torch

    models = load_musetalk(tiny_model_dir, choose_device("cpu"))
    assert models.device.dtype_name == "float32"
    with torch.inference_mode():
        crop = torch.rand(1, 3, 256, 256) * 2 - 1
        latents = models.vae.encode(crop).latent_dist.mean
        assert tuple(latents.shape) == (1, 4, 32, 32)  # the 8x VAE downsampling MuseTalk relies on
        out = models.unet(
            torch.randn(2, 8, 32, 32), torch.zeros(1, dtype=torch.long), encoder_hidden_states=torch.randn(2, 50, 384)
        ).sample
        assert tuple(out.shape) == (2, 4, 32, 32)
        mel = models.feature_extractor(np.zeros(16000, np.float32), sampling_rate=16000, return_tensors="pt")
        hidden = models.whisper_encoder(mel.input_features, output_hidden_states=True).hidden_states
        assert len(hidden) == 5 and tuple(hidden[0].shape) == (1, 1500, 384)
    assert models.vae_scaling_factor == pytest.approx(0.18215)


def test_missing_weights_are_named(model_copy: Path) -> None:
    (model_copy / "musetalkV15" / "unet.pth").unlink()
    with pytest.raises(ModelFilesMissing) as excinfo:
        load_musetalk(model_copy, choose_device("cpu"))
    assert excinfo.value.code == "model_files_missing"
    assert "unet.pth" in excinfo.value.message


def test_truncated_weights_are_corrupt(model_copy: Path) -> None:
    weights = model_copy / "sd-vae" / "diffusion_pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ModelFileCorrupt) as excinfo:
        load_musetalk(model_copy, choose_device("cpu"))
    assert excinfo.value.code == "model_file_corrupt" and "diffusion_pytorch_model.bin" in excinfo.value.message
    assert any(p.code == "model_file_corrupt" for p in check_model_dir(model_copy).problems)


def test_unparsable_config_is_corrupt(model_copy: Path) -> None:
    (model_copy / "whisper" / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ModelFileCorrupt, match=r"preprocessor_config\.json"):
        load_musetalk(model_copy, choose_device("cpu"))


def test_known_bad_v15_config_upload_is_named(model_copy: Path) -> None:
    path = model_copy / "musetalkV15" / "musetalk.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "in_channels": 32, "out_channels": 16}))
    with pytest.raises(ModelConfigInvalid) as excinfo:
        load_musetalk(model_copy, choose_device("cpu"))
    assert excinfo.value.code == "model_config_invalid"
    assert "known bad" in excinfo.value.message and "in_channels=32/out_channels=16" in excinfo.value.message


def test_wrong_cross_attention_width_is_invalid(model_copy: Path) -> None:
    path = model_copy / "musetalkV15" / "musetalk.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "cross_attention_dim": 768}))
    with pytest.raises(ModelConfigInvalid, match=r"cross_attention_dim is 768"):
        load_musetalk(model_copy, choose_device("cpu"))


def test_weights_that_do_not_fit_the_config_fail_the_strict_load(model_copy: Path) -> None:
    path = model_copy / "musetalkV15" / "musetalk.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "block_out_channels": [32, 32]}))
    with pytest.raises(ModelWeightsMismatch) as excinfo:
        load_musetalk(model_copy, choose_device("cpu"))
    assert excinfo.value.code == "model_weights_mismatch" and "unet.pth" in excinfo.value.message


def test_auto_engine_falls_back_to_preview_only_when_no_weights_exist(tmp_path: Path, model_copy: Path) -> None:
    selection = create_engine(EngineConfig(engine="auto", model_dir=tmp_path / "empty"))
    assert selection.name == "preview"
    assert "no MuseTalk weights" in selection.reason and "preview" in selection.reason
    (model_copy / "whisper" / "pytorch_model.bin").unlink()
    with pytest.raises(ModelFilesMissing, match="lipsync models check"):
        create_engine(EngineConfig(engine="auto", model_dir=model_copy))
    with pytest.raises(ModelFilesMissing):
        create_engine(EngineConfig(engine="musetalk", model_dir=tmp_path / "empty"))


def test_models_check_cli_reports_files_and_problems(
    model_copy: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "check", "--model-dir", str(tiny_model_dir), "--json", "--device", "cpu"]) == 0
    good = json.loads(capsys.readouterr().out)
    assert good["ok"] and good["engine_auto_would_use"] == "musetalk"
    assert good["device"] == {"device": "cpu", "dtype": "float32", "reason": "requested"}
    assert all(entry["exists"] and entry["size_bytes"] > 0 for entry in good["files"])

    path = model_copy / "musetalkV15" / "musetalk.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "in_channels": 32, "out_channels": 16}))
    (model_copy / "musetalkV15" / "unet.pth").unlink()
    assert main(["models", "check", "--model-dir", str(model_copy)]) == 1
    text = capsys.readouterr().out
    assert "missing" in text and "[model_files_missing]" in text and "known bad" in text
