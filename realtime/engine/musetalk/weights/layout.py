"""Where MuseTalk v1.5 keeps its files, and what makes each of them valid.

The layout is upstream's (TMElyralab/MuseTalk `download_weights.sh`), so a user's existing
`models/` directory works unchanged::

    models/
      musetalkV15/musetalk.json   UNet2DConditionModel config (in 8, out 4, cross-attention 384)
      musetalkV15/unet.pth        UNet state dict (torch pickle), loaded strictly
      sd-vae/config.json          AutoencoderKL config (diffusers format)
      sd-vae/diffusion_pytorch_model.{safetensors,bin}
      whisper/config.json         whisper-tiny (WhisperConfig)
      whisper/{model.safetensors,pytorch_model.bin}
      whisper/preprocessor_config.json   WhisperFeatureExtractor
      face-parse-bisent/79999_iter.pth          BiSeNet face parsing (optional: the blend mask)
      face-parse-bisent/resnet18-5c106cde.pth   its ResNet-18 backbone (torchvision's file)

Layouts in the wild that are accepted as they are:

* `sd-vae-ft-mse/` instead of `sd-vae/`: upstream's README named the VAE directory so before
  its download script named it `sd-vae/`, and its VAE class still defaults to it; the files
  inside are the same diffusers ones and get the same checks. When both hold a config,
  `sd-vae/` (the current download's) wins.

Layouts that are recognised and named but not accepted (`models check` says what it found):
`whisper/tiny.pt` (MuseTalk v1.0's openai-whisper checkpoint; v1.5 reads the transformers
whisper-tiny files) and `musetalk/pytorch_model.bin` (the v1.0 UNet; this engine runs v1.5).

This module reads JSON and file headers only (no torch), so `lipsync models check` is quick
and works where torch is absent.
"""

from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from realtime.engine.avatar.landmarks import (
    LANDMARK_MODEL_LICENCE,
    LANDMARK_MODEL_NAME,
    landmark_availability,
)
from realtime.engine.errors import ModelConfigInvalid, ModelError, ModelFileCorrupt, ModelFilesMissing

DEFAULT_MODEL_DIR = Path("models")

# MuseTalk v1.5's UNet contract: 4 masked + 4 reference latent channels in, 4 out, whisper-tiny width.
UNET_IN_CHANNELS = 8
UNET_OUT_CHANNELS = 4
WHISPER_WIDTH = 384
WHISPER_HIDDEN_STATES = 5  # embeddings + 4 encoder layers of whisper-tiny
VAE_LATENT_CHANNELS = 4
VAE_DOWNSAMPLE = 8  # 256 px face -> 32x32 latent
# The first musetalkV15/musetalk.json upload (fixed upstream in April 2025) declared these.
KNOWN_BAD_V15_UPLOAD = {"in_channels": 32, "out_channels": 16}
# VAE directory names, the current download's first: the first one that holds a config.json is used.
VAE_DIR_NAMES = ("sd-vae", "sd-vae-ft-mse")
FACE_PARSE_DIR = "face-parse-bisent"
FACE_PARSE_WEIGHTS = "79999_iter.pth"
FACE_PARSE_BACKBONE = "resnet18-5c106cde.pth"
# Files of other MuseTalk versions that a v1.5 model dir may hold instead of what v1.5 needs.
OTHER_VERSION_FILES = {
    "whisper/tiny.pt": "MuseTalk v1.0's openai-whisper checkpoint; v1.5 needs the transformers whisper-tiny "
    "files (whisper/config.json, pytorch_model.bin, preprocessor_config.json from openai/whisper-tiny)",
    "musetalk/pytorch_model.bin": "the MuseTalk v1.0 UNet; this engine runs v1.5 (musetalkV15/unet.pth)",
}
NEARBY_NAMES_SHOWN = 8
# Upstream's landmark model (DWPose, an mmpose RTMPose checkpoint): reported, not loaded.
DWPOSE_WEIGHTS = "dwpose/dw-ll_ucoco_384.pth"
FACE_BOX_CASCADE = "cascade"


@dataclass(frozen=True)
class ModelLayout:
    root: Path

    @property
    def unet_config(self) -> Path:
        return self.root / "musetalkV15" / "musetalk.json"

    @property
    def unet_weights(self) -> Path:
        return self.root / "musetalkV15" / "unet.pth"

    @property
    def vae_dir(self) -> Path:
        """`sd-vae/`, or `sd-vae-ft-mse/` where only that one holds a config (see the module docstring)."""
        for name in VAE_DIR_NAMES:
            if (self.root / name / "config.json").is_file():
                return self.root / name
        for name in VAE_DIR_NAMES:
            if (self.root / name).is_dir():
                return self.root / name
        return self.root / VAE_DIR_NAMES[0]

    @property
    def face_parse_weights(self) -> Path:
        return self.root / FACE_PARSE_DIR / FACE_PARSE_WEIGHTS

    @property
    def face_parse_backbone(self) -> Path:
        return self.root / FACE_PARSE_DIR / FACE_PARSE_BACKBONE

    def variants(self) -> dict[str, str]:
        """Which accepted layout variant each component was found in (role -> directory name)."""
        return {"vae": self.vae_dir.name}

    @property
    def vae_config(self) -> Path:
        return self.vae_dir / "config.json"

    @property
    def whisper_dir(self) -> Path:
        return self.root / "whisper"

    @property
    def whisper_config(self) -> Path:
        return self.whisper_dir / "config.json"

    @property
    def whisper_preprocessor(self) -> Path:
        return self.whisper_dir / "preprocessor_config.json"

    def vae_weights(self) -> Path:
        return _first_existing(
            self.vae_dir, ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
        )

    def whisper_weights(self) -> Path:
        return _first_existing(self.whisper_dir, ("model.safetensors", "pytorch_model.bin"))

    def required_files(self) -> list[tuple[str, Path]]:
        """(role, path) of every file the engine reads, weights resolved to the format present."""
        return [
            ("unet_config", self.unet_config),
            ("unet_weights", self.unet_weights),
            ("vae_config", self.vae_config),
            ("vae_weights", self.vae_weights()),
            ("whisper_config", self.whisper_config),
            ("whisper_weights", self.whisper_weights()),
            ("whisper_preprocessor", self.whisper_preprocessor),
        ]


def _first_existing(directory: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return directory / names[-1]  # the upstream download's name, reported as missing


@dataclass(frozen=True)
class FileStatus:
    role: str
    path: Path
    exists: bool
    size_bytes: int


@dataclass(frozen=True)
class Problem:
    code: str
    message: str


@dataclass
class ModelCheckReport:
    model_dir: Path
    files: list[FileStatus] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    variants: dict[str, str] = field(default_factory=dict)
    # Face parsing is optional: without its files the blend mask is the ellipse (half there or broken: a
    # problem).
    face_parsing: FaceParsingStatus | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def any_present(self) -> bool:
        return any(f.exists for f in self.files)

    def raise_first(self) -> None:
        """Raise the first problem as its typed error (missing files first, then corrupt, then config)."""
        order = {ModelFilesMissing.code: 0, ModelFileCorrupt.code: 1, ModelConfigInvalid.code: 2}
        if not self.problems:
            return
        first = sorted(self.problems, key=lambda p: order.get(p.code, 3))[0]
        cls = {c.code: c for c in (ModelFilesMissing, ModelFileCorrupt, ModelConfigInvalid)}.get(
            first.code, ModelError
        )
        raise cls(first.message)

    def to_json(self) -> dict[str, Any]:
        return {
            "model_dir": str(self.model_dir),
            "ok": self.ok,
            "files": [
                {"role": f.role, "path": str(f.path), "exists": f.exists, "size_bytes": f.size_bytes}
                for f in self.files
            ],
            "problems": [{"code": p.code, "message": p.message} for p in self.problems],
            "variants": dict(self.variants),
            "face_parsing": self.face_parsing.to_json() if self.face_parsing else None,
            "face_box": face_box_status(self.model_dir),
        }


def face_box_status(model_dir: Path) -> dict[str, Any]:
    """Which face box preparation computes (with the default `face_box="auto"`), from which landmark model,
    and whether upstream's own landmark model is in the model dir."""
    dwpose = Path(model_dir) / DWPOSE_WEIGHTS
    landmarks = landmark_availability()
    status: dict[str, Any] = {
        "source": f"landmarks:{LANDMARK_MODEL_NAME}" if landmarks.usable else FACE_BOX_CASCADE,
        "detail": (
            "upstream's box from 68 landmarks per frame (dlib's shape predictor), smoothed over 5 frames "
            "(at most 2 px); the cascade mapping where a frame has none (avatar manifest boxes win)"
            if landmarks.usable
            else "LBP cascade box mapped onto upstream's landmark geometry (avatar manifest boxes win)"
        ),
        "landmark_model": {
            "usable": landmarks.usable,
            "file": str(landmarks.model_file) if landmarks.model_file else None,
            "detail": landmarks.why,
            "licence": LANDMARK_MODEL_LICENCE,
        },
        "dwpose_present": dwpose.is_file(),
        "dwpose_used": False,
        "why": f"{DWPOSE_WEIGHTS} is an mmpose RTMPose checkpoint, which this engine does not implement",
    }
    return status


@dataclass(frozen=True)
class FaceParsingStatus:
    """Whether the BiSeNet face-parsing files are usable, and so which blend mask avatars get."""

    files: list[FileStatus]
    problems: list[Problem]

    @property
    def usable(self) -> bool:
        return all(f.exists for f in self.files) and not self.problems

    @property
    def mask(self) -> str:
        return "parsed_jaw" if self.usable else "ellipse"

    def to_json(self) -> dict[str, Any]:
        return {
            "present": all(f.exists for f in self.files),
            "usable": self.usable,
            "blend_mask": self.mask,
            "files": [
                {"role": f.role, "path": str(f.path), "exists": f.exists, "size_bytes": f.size_bytes}
                for f in self.files
            ],
            "problems": [{"code": p.code, "message": p.message} for p in self.problems],
        }


# --- config validation -----------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a typed error naming the file."""
    if not path.is_file():
        raise ModelFilesMissing(f"{path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileCorrupt(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelFileCorrupt(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def unet_config_problems(config: dict[str, Any], path: Path) -> list[str]:
    """What is wrong with a musetalk.json, in plain words (empty when it is MuseTalk v1.5's)."""
    problems = []
    in_ch, out_ch = config.get("in_channels"), config.get("out_channels")
    if (in_ch, out_ch) == (KNOWN_BAD_V15_UPLOAD["in_channels"], KNOWN_BAD_V15_UPLOAD["out_channels"]):
        problems.append(
            f"{path} declares in_channels=32/out_channels=16: this is the known bad "
            "musetalkV15/musetalk.json upload (fixed upstream in April 2025); "
            "download musetalkV15/musetalk.json again "
            "(MuseTalk v1.5 needs in_channels=8, out_channels=4)"
        )
    else:
        if in_ch != UNET_IN_CHANNELS:
            problems.append(f"{path}: in_channels is {in_ch!r}, MuseTalk v1.5 needs {UNET_IN_CHANNELS}")
        if out_ch != UNET_OUT_CHANNELS:
            problems.append(f"{path}: out_channels is {out_ch!r}, MuseTalk v1.5 needs {UNET_OUT_CHANNELS}")
    cross = config.get("cross_attention_dim")
    if cross != WHISPER_WIDTH:
        problems.append(
            f"{path}: cross_attention_dim is {cross!r}, "
            f"MuseTalk v1.5 needs {WHISPER_WIDTH} (whisper-tiny features)"
        )
    name = config.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        problems.append(f"{path}: _class_name is {name!r}, expected UNet2DConditionModel")
    return problems


def vae_config_problems(config: dict[str, Any], path: Path) -> list[str]:
    problems = []
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        problems.append(f"{path}: _class_name is {name!r}, expected AutoencoderKL")
    if config.get("latent_channels", VAE_LATENT_CHANNELS) != VAE_LATENT_CHANNELS:
        problems.append(f"{path}: latent_channels must be {VAE_LATENT_CHANNELS}")
    blocks = config.get("block_out_channels", [])
    # AutoencoderKL downsamples once between consecutive encoder blocks: 4 blocks = 8x.
    if not isinstance(blocks, list) or 2 ** (len(blocks) - 1) != VAE_DOWNSAMPLE:
        problems.append(
            f"{path}: block_out_channels {blocks!r} must have 4 entries (8x downsampling, 256 px -> 32)"
        )
    return problems


def whisper_config_problems(config: dict[str, Any], path: Path) -> list[str]:
    problems = []
    if config.get("d_model") != WHISPER_WIDTH:
        problems.append(f"{path}: d_model is {config.get('d_model')!r}, whisper-tiny has {WHISPER_WIDTH}")
    if config.get("encoder_layers") != WHISPER_HIDDEN_STATES - 1:
        problems.append(
            f"{path}: encoder_layers is {config.get('encoder_layers')!r}, whisper-tiny has "
            f"{WHISPER_HIDDEN_STATES - 1} (MuseTalk v1.5 uses its {WHISPER_HIDDEN_STATES} hidden states)"
        )
    if config.get("num_mel_bins", 80) != 80:
        problems.append(f"{path}: num_mel_bins must be 80")
    return problems


# --- weight file headers ---------------------------------------------------------------------


def weight_file_problem(path: Path) -> str | None:
    """A cheap structural check of a weight file (header only); None when it looks sound."""
    try:
        size = path.stat().st_size
        if size == 0:
            return f"{path} is empty"
        if path.suffix == ".safetensors":
            with path.open("rb") as handle:
                header_len = struct.unpack("<Q", handle.read(8))[0]
                if header_len <= 0 or header_len > size - 8:
                    return f"{path} is not a safetensors file (bad header length)"
                json.loads(handle.read(header_len))
            return None
        # torch.save writes a zip archive with a data.pkl record.
        if not zipfile.is_zipfile(path):
            return f"{path} is not a torch checkpoint (not a zip archive; truncated or corrupt download?)"
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return f"{path} is not a torch checkpoint (no data.pkl inside)"
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        return f"{path} cannot be read as a weight file ({exc})"
    return None


def check_model_dir(model_dir: Path) -> ModelCheckReport:
    """Which files exist, their sizes, and everything wrong with them, without loading any weights."""
    layout = ModelLayout(Path(model_dir))
    report = ModelCheckReport(model_dir=Path(model_dir), variants=layout.variants())
    for role, path in layout.required_files():
        exists = path.is_file()
        report.files.append(FileStatus(role, path, exists, path.stat().st_size if exists else 0))
        if not exists:
            report.problems.append(
                Problem(ModelFilesMissing.code, f"{role}: {path} is missing{nearby(path)}")
            )
    checks = (
        (layout.unet_config, unet_config_problems),
        (layout.vae_config, vae_config_problems),
        (layout.whisper_config, whisper_config_problems),
    )
    for path, validate in checks:
        if not path.is_file():
            continue
        try:
            config = read_json(path)
        except ModelError as exc:
            report.problems.append(Problem(exc.code, exc.message))
            continue
        report.problems.extend(Problem(ModelConfigInvalid.code, text) for text in validate(config, path))
    if layout.whisper_preprocessor.is_file():
        try:
            read_json(layout.whisper_preprocessor)
        except ModelError as exc:
            report.problems.append(Problem(exc.code, exc.message))
    for path in (layout.unet_weights, layout.vae_weights(), layout.whisper_weights()):
        if path.is_file() and (problem := weight_file_problem(path)) is not None:
            report.problems.append(Problem(ModelFileCorrupt.code, problem))
    report.face_parsing = check_face_parsing(layout)
    if any(f.exists for f in report.face_parsing.files):
        # Optional, but half there or broken is a problem like any other: the user meant to use it.
        report.problems.extend(report.face_parsing.problems)
    return report


def check_face_parsing(layout: ModelLayout) -> FaceParsingStatus:
    files, problems = [], []
    for role, path in (
        ("face_parse_weights", layout.face_parse_weights),
        ("face_parse_backbone", layout.face_parse_backbone),
    ):
        exists = path.is_file()
        files.append(FileStatus(role, path, exists, path.stat().st_size if exists else 0))
        if not exists:
            problems.append(Problem(ModelFilesMissing.code, f"{role}: {path} is missing{nearby(path)}"))
        elif (problem := weight_file_problem(path)) is not None:
            problems.append(Problem(ModelFileCorrupt.code, problem))
    return FaceParsingStatus(files, problems)


def nearby(path: Path) -> str:
    """What the model dir holds where `path` was expected, as a clause for a 'missing' message ('' if
    nothing)."""
    parent = path.parent
    root = parent.parent
    # The directory name without its version or variant suffix: musetalkV15 -> musetalk, sd-vae-ft-mse -> sd.
    stem = parent.name.split("-")[0].rstrip("V0123456789").lower()
    notes = []
    for relative, meaning in OTHER_VERSION_FILES.items():
        other = root / relative
        if other.is_file() and (other.parent == parent or other.parent.name.lower().startswith(stem)):
            notes.append(f"found {relative} instead: {meaning}")
    if parent.is_dir():
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in parent.iterdir())
        shown = ", ".join(names[:NEARBY_NAMES_SHOWN]) + (", ..." if len(names) > NEARBY_NAMES_SHOWN else "")
        notes.append(f"{parent.name}/ holds: {shown}" if names else f"{parent.name}/ is empty")
    elif root.is_dir():
        similar = sorted(
            p.name + "/" for p in root.iterdir() if p.is_dir() and p.name.lower().startswith(stem)
        )
        if similar:
            notes.append(f"no {parent.name}/ in {root}, but found {', '.join(similar[:NEARBY_NAMES_SHOWN])}")
        else:
            names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
            if names:
                notes.append(f"{root} holds: {', '.join(names[:NEARBY_NAMES_SHOWN])}")
    return f" ({'; '.join(notes)})" if notes else ""
