"""Face box and blend mask figures for the astronaut avatar (issue 21's closing figures).

    python -m bench.face_box --json PATH

For the astronaut photo (512², a real face) frontal and warped into tilted (roll ±10°) and turned
(one side squeezed, as a yaw does) variants: the landmark face box (upstream's rule on dlib's 68
landmarks, as preparation computes it) against the cascade mapping, as pixel offsets per side and
IoU, and the landmark box's largest offset from upstream's rule applied to the same landmarks.
For the frontal avatar: the fallback ellipse against the parsed "jaw" mask over the same crop box.
The parse runs BiSeNet with RANDOM weights (no real weights here), so that mask is a random
network's, not a face's: the figure shows the pipeline, not upstream's mask quality.
Imports only numpy, OpenCV, scikit-image, torch and dlib.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import cpu_name
from realtime.engine.avatar.blend_mask import (
    BlendMaskSettings,
    face_box_mask,
    parse_crops,
    region_from_labels,
)
from realtime.engine.avatar.face import (
    Box,
    FaceDetector,
    crop_box_v15,
    lower_face_mask,
    musetalk_box_from_landmarks,
)
from realtime.engine.avatar.prepare import prepare_avatar

FACE_CENTER = (222.0, 125.0)  # the astronaut's nose, frame pixels
MASK_LEVEL = 128  # a blend mask pixel counts as repainted from half weight up


def tilted(image: np.ndarray, degrees: float) -> np.ndarray:
    """`image` rotated by `degrees` about the astronaut's nose (a tilted head)."""
    import cv2  # noqa: PLC0415 (heavy native library: loaded on first use)

    rotation = cv2.getRotationMatrix2D(FACE_CENTER, degrees, 1.0)
    return cv2.warpAffine(image, rotation, (image.shape[1], image.shape[0]), borderMode=cv2.BORDER_REFLECT)


def turned(image: np.ndarray, side: int) -> np.ndarray:
    """One side of the face (`side` > 0: the image's right) squeezed in height and pulled inwards, as a head
    turned that way looks."""
    import cv2  # noqa: PLC0415 (heavy native library: loaded on first use)

    src = np.array([[150, 40], [300, 40], [300, 220], [150, 220]], np.float32)
    dst = src.copy()
    near = [1, 2] if side > 0 else [0, 3]  # the corners of the side that turns away
    dst[near[0], 1] += 25
    dst[near[1], 1] -= 25
    dst[near, 0] -= 30 * side
    warp = cv2.getPerspectiveTransform(src, dst)
    return cv2.warpPerspective(image, warp, (image.shape[1], image.shape[0]), borderMode=cv2.BORDER_REFLECT)


def astronaut_variants() -> dict[str, np.ndarray]:
    from skimage.data import astronaut  # noqa: PLC0415 (heavy: scikit-image)

    image = astronaut()
    return {
        "frontal": image,
        "tilted-left": tilted(image, 10),
        "tilted-right": tilted(image, -10),
        "turned-left": turned(image, -1),
        "turned-right": turned(image, 1),
    }


def box_iou(a: Box, b: Box) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def first_box(face_boxes: np.ndarray) -> Box:
    x1, y1, x2, y2 = (int(v) for v in face_boxes[0])
    return (x1, y1, x2, y2)


def png(frame: np.ndarray) -> bytes:
    import cv2  # noqa: PLC0415 (heavy native library: loaded on first use)

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()


def box_figures(cache_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for name, frame in astronaut_variants().items():
        avatar = prepare_avatar(png(frame), engine="preview", engine_version="bench", cache_root=cache_dir)
        landmark_box = first_box(avatar.face_boxes)
        cascade = FaceDetector().detect(frame)
        rule = (
            musetalk_box_from_landmarks(avatar.landmarks[0], frame.shape[0])
            if avatar.landmarks is not None
            else None
        )
        row: dict[str, Any] = {
            "variant": name,
            "face_box_source": avatar.face_box_source,
            "landmark_box": list(landmark_box),
            "cascade_box": list(cascade) if cascade else None,
            "upstream_rule_max_offset_px": (
                max(abs(a - b) for a, b in zip(landmark_box, rule, strict=True)) if rule else None
            ),
        }
        if cascade:
            row["landmark_minus_cascade_px"] = dict(
                zip(
                    ("x1", "y1", "x2", "y2"),
                    (a - b for a, b in zip(landmark_box, cascade, strict=True)),
                    strict=True,
                )
            )
            row["iou"] = round(box_iou(landmark_box, cascade), 3)
        rows.append(row)
    return rows


def mask_figures(seed: int) -> dict[str, Any]:
    """The frontal astronaut's crop box: the fallback ellipse vs the parsed jaw mask (random BiSeNet)."""
    import cv2  # noqa: PLC0415 (heavy native library: loaded on first use)
    import torch  # noqa: PLC0415 (heavy: torch)

    from realtime.engine.musetalk.weights.face_parse import FaceParser, build_bisenet  # noqa: PLC0415 (torch)

    frame = astronaut_variants()["frontal"]
    with tempfile.TemporaryDirectory(prefix="bench-face-box-") as tmp:
        avatar = prepare_avatar(png(frame), engine="preview", engine_version="bench", cache_root=Path(tmp))
        face_box = first_box(avatar.face_boxes)
    crop = crop_box_v15(face_box, frame.shape[0])
    torch.manual_seed(seed)
    parser = FaceParser(build_bisenet().eval(), torch.device("cpu"), torch.float32, "random", 0.0)
    settings = BlendMaskSettings()
    labels = parser.labels(parse_crops(frame[None], [crop], settings))[0]
    parsed = face_box_mask(region_from_labels(labels, settings.mode, settings.cheek_width_px), crop, settings)
    height, width = parsed.shape
    ellipse = cv2.resize(lower_face_mask(), (width, height), interpolation=cv2.INTER_LINEAR)
    ellipse_on, parsed_on = ellipse >= MASK_LEVEL / 255, parsed >= MASK_LEVEL
    union = int(np.logical_or(ellipse_on, parsed_on).sum())
    return {
        "face_box": list(face_box),
        "crop_box": list(crop),
        "parse_weights": f"random (BiSeNet architecture, torch seed {seed}): the parse is not a face's",
        "ellipse_px": int(ellipse_on.sum()),
        "parsed_px": int(parsed_on.sum()),
        "iou": round(int(np.logical_and(ellipse_on, parsed_on).sum()) / union, 3) if union else None,
        "ellipse_over_parsed_area": round(int(ellipse_on.sum()) / max(1, int(parsed_on.sum())), 3),
        "level": f"pixels at >= {MASK_LEVEL}/255 of the blend weight",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.face_box", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random parse weights")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-face-box-") as tmp:
        boxes = box_figures(Path(tmp))
    document = {
        "benchmark": "face_box",
        "device": cpu_name(),
        "settings": {"image": "skimage.data.astronaut(), 512x512", "seed": args.seed},
        "summary": {
            "landmark_vs_upstream_rule_max_px": max((r["upstream_rule_max_offset_px"] or 0) for r in boxes),
            "landmark_vs_cascade_iou_min": min((r["iou"] for r in boxes if "iou" in r), default=None),
            "cascade_found_no_face": [r["variant"] for r in boxes if r["cascade_box"] is None],
        },
        "results": boxes,
        "mask": mask_figures(args.seed),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
