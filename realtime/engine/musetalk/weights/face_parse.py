"""BiSeNet face parsing as MuseTalk v1.5 ships it (`models/face-parse-bisent/`), for the jaw blend mask.

The network is the face-parsing BiSeNet that upstream loads (19 CelebAMask-HQ classes: 1 skin,
10 nose, 11 mouth, 12 upper lip, 13 lower lip, 14 neck, ...): a ResNet-18 context path with two
attention-refinement modules, the ResNet's 1/8 features standing in for the spatial path, a
feature-fusion module and three output heads. Module names follow the checkpoint's keys
(`cp.resnet.layer1.0.conv1.weight`, `ffm.convblk.conv.weight`, ...), so `79999_iter.pth` loads
strictly with no key remapping. As upstream, the backbone file (torchvision's
`resnet18-5c106cde.pth`, its `fc.*` classifier ignored) is loaded first and the parsing
checkpoint, which holds the backbone too, is loaded over it.

Inference: the crop resized to 512² (antialiased bilinear, like PIL's bilinear downscale),
ImageNet mean/std normalisation, the fused head's logits upsampled (bilinear, corners aligned)
to 512² and arg-maxed to a label map. Only the fused head is evaluated; the two auxiliary heads
exist for the checkpoint's keys.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from realtime.engine.errors import ModelFileCorrupt, ModelFilesMissing, ModelWeightsMismatch
from realtime.engine.musetalk.weights.layout import ModelLayout, weight_file_problem

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PARSE_INPUT_PX = 512
PARSE_CLASSES = 19
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PARSE_BATCH = 8  # crops per forward pass: bounds the 512² activations' memory


def build_bisenet(n_classes: int = PARSE_CLASSES) -> Any:
    """The BiSeNet module (random init), with the checkpoint's module names."""
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)
    from torch import nn  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)
    from torch.nn import functional as F  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    class ConvNormReLU(nn.Module):
        def __init__(self, cin: int, cout: int, kernel: int = 3, padding: int = 1) -> None:
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, kernel, 1, padding, bias=False)
            self.bn = nn.BatchNorm2d(cout)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.bn(self.conv(x)))

    conv_bn_relu = ConvNormReLU

    class ResidualBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if cin != cout or stride != 1
                else None
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            shortcut = x if self.downsample is None else self.downsample(x)
            return F.relu(shortcut + branch)

    def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(ResidualBlock(cin, cout, stride), ResidualBlock(cout, cout, 1))

    class Backbone(nn.Module):
        """ResNet-18 without its classifier; returns the 1/8, 1/16 and 1/32 features."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = stage(64, 64, 1)
            self.layer2 = stage(64, 128, 2)
            self.layer3 = stage(128, 256, 2)
            self.layer4 = stage(256, 512, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
            eighth = self.layer2(self.layer1(x))
            sixteenth = self.layer3(eighth)
            return eighth, sixteenth, self.layer4(sixteenth)

    class Refinement(nn.Module):
        """Features re-weighted per channel by a sigmoid of their global average."""

        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.conv = conv_bn_relu(cin, cout)
            self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
            self.bn_atten = nn.BatchNorm2d(cout)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            features = self.conv(x)
            weights = torch.sigmoid(self.bn_atten(self.conv_atten(features.mean(dim=(2, 3), keepdim=True))))
            return features * weights

    class ContextPath(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.resnet = Backbone()
            self.arm16 = Refinement(256, 128)
            self.arm32 = Refinement(512, 128)
            self.conv_head32 = conv_bn_relu(128, 128)
            self.conv_head16 = conv_bn_relu(128, 128)
            self.conv_avg = conv_bn_relu(512, 128, kernel=1, padding=0)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            eighth, sixteenth, thirtysecond = self.resnet(x)
            context = self.conv_avg(
                thirtysecond.mean(dim=(2, 3), keepdim=True)
            )  # broadcast = nearest upsample
            up32 = F.interpolate(self.arm32(thirtysecond) + context, size=sixteenth.shape[2:], mode="nearest")
            up32 = self.conv_head32(up32)
            up16 = F.interpolate(self.arm16(sixteenth) + up32, size=eighth.shape[2:], mode="nearest")
            return eighth, self.conv_head16(up16)

    class Fusion(nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.convblk = conv_bn_relu(cin, cout, kernel=1, padding=0)
            self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
            self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

        def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            features = self.convblk(torch.cat([spatial, context], dim=1))
            gate = torch.sigmoid(self.conv2(F.relu(self.conv1(features.mean(dim=(2, 3), keepdim=True)))))
            return features * (1 + gate)

    class Head(nn.Module):
        def __init__(self, cin: int, mid: int, classes: int) -> None:
            super().__init__()
            self.conv = conv_bn_relu(cin, mid)
            self.conv_out = nn.Conv2d(mid, classes, 1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv_out(self.conv(x))

    class BiSeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cp = ContextPath()
            self.ffm = Fusion(256, 256)
            self.conv_out = Head(256, 256, n_classes)
            self.conv_out16 = Head(128, 64, n_classes)  # auxiliary training heads: loaded, not evaluated
            self.conv_out32 = Head(128, 64, n_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """Logits `[B, classes, H, W]` of the fused head at the input's size."""
            eighth, context = self.cp(x)
            logits = self.conv_out(self.ffm(eighth, context))
            return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=True)

    return BiSeNet()


def _read(path: Path) -> dict[str, Any]:
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    if not path.is_file():
        raise ModelFilesMissing(f"{path} is missing")
    if (problem := weight_file_problem(path)) is not None:
        raise ModelFileCorrupt(problem)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to deserialise is a corrupt file to the user
        raise ModelFileCorrupt(f"{path} cannot be loaded ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileCorrupt(f"{path} does not hold a state dict of tensors")
    return state


def _load_strict(module: Any, state: dict[str, Any], path: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelWeightsMismatch(
            f"{path}: not a face-parsing BiSeNet state dict: {str(exc)[:1200]}"
        ) from exc


@dataclass
class FaceParser:
    """A loaded BiSeNet on a device; `labels` turns RGB crops into 512² label maps."""

    net: Any
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    fingerprint: str  # identifies the weights (part of the avatar cache key)
    load_ms: float

    def labels(self, crops: list[np.ndarray]) -> np.ndarray:
        """Label maps `[B, 512, 512]` uint8 of RGB uint8 crops of any sizes."""
        import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)
        from torch.nn import functional as F  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

        out = np.zeros((len(crops), PARSE_INPUT_PX, PARSE_INPUT_PX), np.uint8)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        with torch.inference_mode():
            for start in range(0, len(crops), PARSE_BATCH):
                batch = []
                for crop in crops[start : start + PARSE_BATCH]:
                    pixels = (
                        torch.from_numpy(np.ascontiguousarray(crop))
                        .to(self.device)
                        .permute(2, 0, 1)[None]
                        .float()
                    )
                    resized = F.interpolate(
                        pixels,
                        size=(PARSE_INPUT_PX, PARSE_INPUT_PX),
                        mode="bilinear",
                        align_corners=False,
                        antialias=True,
                    )
                    batch.append(resized.round().clamp(0, 255) / 255.0)
                normalised = (torch.cat(batch) - mean) / std
                logits = self.net(normalised.to(self.dtype))
                out[start : start + len(batch)] = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
        return out


def load_face_parser(layout: ModelLayout, device: Any, dtype: Any) -> FaceParser:
    """BiSeNet from `face-parse-bisent/` (backbone, then the parsing checkpoint over it), strict; typed
    errors."""
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    started = time.perf_counter()
    net = build_bisenet()
    backbone_path, weights_path = layout.face_parse_backbone, layout.face_parse_weights
    backbone = {k: v for k, v in _read(backbone_path).items() if not k.startswith("fc.")}
    _load_strict(net.cp.resnet, backbone, backbone_path)
    _load_strict(net, _read(weights_path), weights_path)
    net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    digest = hashlib.sha256()
    for path in (backbone_path, weights_path):
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    load_ms = (time.perf_counter() - started) * 1000
    logger.info("face parser loaded", extra={"path": str(weights_path), "ms": load_ms})
    return FaceParser(net, torch.device(device), dtype, digest.hexdigest(), load_ms)


def write_random_face_parse(layout: ModelLayout, seed: int = 0) -> None:
    """Random BiSeNet weights in upstream's files and formats (the backbone file with a torchvision-style
    `fc`)."""
    import torch  # noqa: PLC0415 (torch stack: loaded when an engine is built, never at import)

    torch.manual_seed(seed)
    net = build_bisenet()
    layout.face_parse_weights.parent.mkdir(parents=True, exist_ok=True)
    backbone = {k: v.clone() for k, v in net.cp.resnet.state_dict().items()}
    backbone["fc.weight"] = torch.randn(1000, 512) * 0.01
    backbone["fc.bias"] = torch.zeros(1000)
    torch.save(backbone, layout.face_parse_backbone)
    torch.save(net.state_dict(), layout.face_parse_weights)
