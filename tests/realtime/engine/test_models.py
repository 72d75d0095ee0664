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
from realtime.engine.errors import (
    ModelConfigInvalid,
    ModelFileCorrupt,
    ModelFilesMissing,
    ModelWeightsMismatch,
)
from realtime.engine.musetalk.weights.layout import ModelLayout, check_model_dir
from realtime.engine.musetalk.weights.loader import load_musetalk


@pytest.fixture()
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(tiny_model_dir, target, ignore=shutil.ignore_patterns("face-parse-bisent"))
    # The ~100 MB of parse weights as links: a test that changes one unlinks it first and writes its own.
    (target / "face-parse-bisent").mkdir()
    for path in (tiny_model_dir / "face-parse-bisent").iterdir():
        (target / "face-parse-bisent" / path.name).symlink_to(path)
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
            torch.randn(2, 8, 32, 32),
            torch.zeros(1, dtype=torch.long),
            encoder_hidden_states=torch.randn(2, 50, 384),
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
    assert (
        excinfo.value.code == "model_file_corrupt" and "diffusion_pytorch_model.bin" in excinfo.value.message
    )
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


def test_auto_engine_falls_back_to_preview_only_when_no_weights_exist(
    tmp_path: Path, model_copy: Path
) -> None:
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


def test_sd_vae_ft_mse_layout_is_accepted_and_named(
    model_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (model_copy / "sd-vae").rename(model_copy / "sd-vae-ft-mse")
    report = check_model_dir(model_copy)
    assert report.ok and report.variants == {"vae": "sd-vae-ft-mse"}
    assert ModelLayout(model_copy).vae_weights().parent.name == "sd-vae-ft-mse"
    assert main(["models", "check", "--model-dir", str(model_copy), "--device", "cpu"]) == 0
    assert "vae in sd-vae-ft-mse/" in capsys.readouterr().out
    assert (
        main(["models", "check", "--model-dir", str(model_copy), "--device", "cpu", "--load", "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["load"]["blend_mask"].startswith("parsed jaw blend mask")
    models = load_musetalk(model_copy, choose_device("cpu"))
    assert models.vae_scaling_factor == pytest.approx(0.18215)
    # The same checks as sd-vae/: a bad config there is named there.
    config = model_copy / "sd-vae-ft-mse" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "latent_channels": 8}))
    assert any("sd-vae-ft-mse/config.json" in p.message for p in check_model_dir(model_copy).problems)


def test_sd_vae_wins_over_sd_vae_ft_mse_when_both_hold_a_config(model_copy: Path) -> None:
    shutil.copytree(model_copy / "sd-vae", model_copy / "sd-vae-ft-mse")
    (model_copy / "sd-vae-ft-mse" / "config.json").write_text("{not json")
    report = check_model_dir(model_copy)
    assert report.ok and report.variants == {"vae": "sd-vae"}


def test_a_missing_file_names_what_was_found_nearby(model_copy: Path) -> None:
    (model_copy / "whisper" / "config.json").rename(model_copy / "whisper" / "tiny.pt")
    shutil.rmtree(model_copy / "musetalkV15")
    (model_copy / "musetalk").mkdir()
    (model_copy / "musetalk" / "pytorch_model.bin").write_bytes(b"v1.0 unet")
    messages = {p.message.split(":")[0]: p.message for p in check_model_dir(model_copy).problems}
    assert "found whisper/tiny.pt instead" in messages["whisper_config"]
    assert "MuseTalk v1.0" in messages["whisper_config"] and "whisper/ holds: " in messages["whisper_config"]
    assert "found musetalk/pytorch_model.bin instead" in messages["unet_weights"]
    assert "no musetalkV15/" in messages["unet_weights"] and "musetalk/" in messages["unet_weights"]
    shutil.rmtree(model_copy / "sd-vae")
    (model_copy / "vae").mkdir()
    messages = {p.message.split(":")[0]: p.message for p in check_model_dir(model_copy).problems}
    assert f"{model_copy} holds: " in messages["vae_config"] and "vae/" in messages["vae_config"]


def test_face_parse_weights_load_strictly_and_parse(tiny_model_dir: Path) -> None:
    import torch

    from realtime.engine.musetalk.weights.face_parse import load_face_parser

    report = check_model_dir(tiny_model_dir)
    assert (
        report.face_parsing is not None
        and report.face_parsing.usable
        and report.face_parsing.mask == "parsed_jaw"
    )
    layout = ModelLayout(tiny_model_dir)
    for path in (layout.face_parse_weights, layout.face_parse_backbone):
        assert zipfile.is_zipfile(path)
    assert "fc.weight" in torch.load(
        layout.face_parse_backbone, weights_only=True
    )  # torchvision's resnet18 file
    parser = load_face_parser(layout, torch.device("cpu"), torch.float32)
    labels = parser.labels([np.zeros((90, 70, 3), np.uint8), np.full((300, 300, 3), 128, np.uint8)])
    assert labels.shape == (2, 512, 512) and labels.dtype == np.uint8 and labels.max() < 19


def test_face_parse_weights_that_are_not_bisenet_fail_the_strict_load(model_copy: Path) -> None:
    import torch

    from realtime.engine.musetalk.weights.face_parse import load_face_parser

    layout = ModelLayout(model_copy)
    state = torch.load(layout.face_parse_weights, weights_only=True)
    del state["conv_out16.conv_out.weight"]
    layout.face_parse_weights.unlink()  # a link to the shared checkpoint
    torch.save(state, layout.face_parse_weights)
    with pytest.raises(ModelWeightsMismatch, match=r"(?s)79999_iter\.pth.*conv_out16"):
        load_face_parser(layout, torch.device("cpu"), torch.float32)
    with pytest.raises(ModelWeightsMismatch):
        load_musetalk(model_copy, choose_device("cpu"))


def test_half_present_face_parsing_is_a_problem(model_copy: Path) -> None:
    (model_copy / "face-parse-bisent" / "resnet18-5c106cde.pth").unlink()
    report = check_model_dir(model_copy)
    assert not report.ok and any(p.message.startswith("face_parse_backbone:") for p in report.problems)
    with pytest.raises(ModelFilesMissing, match=r"resnet18-5c106cde\.pth"):
        create_engine(EngineConfig(engine="auto", model_dir=model_copy, device="cpu"))
    (model_copy / "face-parse-bisent" / "resnet18-5c106cde.pth").write_bytes(b"truncated")
    assert any(p.code == "model_file_corrupt" for p in check_model_dir(model_copy).problems)


def test_without_face_parse_weights_the_ellipse_is_used_and_said(
    model_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.rmtree(model_copy / "face-parse-bisent")
    report = check_model_dir(model_copy)
    assert report.ok and report.face_parsing is not None and report.face_parsing.mask == "ellipse"
    assert main(["models", "check", "--model-dir", str(model_copy), "--json", "--device", "cpu"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert (
        document["face_parsing"]["present"] is False and document["face_parsing"]["blend_mask"] == "ellipse"
    )
    assert (
        document["face_box"]["source"] == "landmarks:dlib-68"
        and document["face_box"]["dwpose_present"] is False
    )
    landmark_model = document["face_box"]["landmark_model"]
    assert landmark_model["usable"] is True and landmark_model["file"].endswith("68_face_landmarks.dat")
    assert "commercial" in landmark_model["licence"]
    (model_copy / "dwpose").mkdir()
    (model_copy / "dwpose" / "dw-ll_ucoco_384.pth").write_bytes(b"rtmpose")
    assert main(["models", "check", "--model-dir", str(model_copy), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "face box: landmarks:dlib-68" in printed and "landmark model: dlib 68-point" in printed
    face_box = check_model_dir(model_copy).to_json()["face_box"]
    assert (
        face_box["dwpose_present"] is True
        and face_box["dwpose_used"] is False
        and "RTMPose" in face_box["why"]
    )
    selection = create_engine(EngineConfig(engine="auto", model_dir=model_copy, device="cpu"))
    assert "ellipse blend mask" in selection.reason and "ellipse blend mask" in selection.engine.info.detail


def test_make_tiny_without_face_parse_writes_a_valid_ellipse_layout(tmp_path: Path) -> None:
    assert main(["models", "make-tiny", str(tmp_path / "m"), "--no-face-parse"]) == 0
    report = check_model_dir(tmp_path / "m")
    assert report.ok and report.face_parsing is not None and report.face_parsing.mask == "ellipse"
    assert not (tmp_path / "m" / "face-parse-bisent").exists()
