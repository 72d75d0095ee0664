"""`lipsync models check|make-tiny`: what is in the model dir and what is wrong with it; tiny checkpoints."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from realtime.engine.musetalk.check import check_document
from realtime.engine.musetalk.weights.face_parse import write_random_face_parse
from realtime.engine.musetalk.weights.layout import DEFAULT_MODEL_DIR
from realtime.engine.musetalk.weights.random import write_checkpoint

__all__ = ["check_document", "register"]  # check_document: also what the API's /debug/musetalk serves


def register(subparsers: Any) -> None:
    models = subparsers.add_parser(
        "models", help="inspect MuseTalk v1.5 model files; write tiny test checkpoints"
    )
    sub = models.add_subparsers(dest="models_command", metavar="ACTION")

    check = sub.add_parser("check", help="list the model files, their sizes, config validity and problems")
    check.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="default ./models")
    check.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (what would be used)")
    check.add_argument(
        "--load", action="store_true", help="also load every model (strict) to prove the weights fit"
    )
    check.add_argument("--json", action="store_true", help="print one JSON document")
    check.set_defaults(handler=_check)

    tiny = sub.add_parser(
        "make-tiny", help="write a tiny random checkpoint in the real layout and file formats"
    )
    tiny.add_argument("model_dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--no-face-parse",
        action="store_true",
        help="leave out face-parse-bisent/ (random BiSeNet weights, ~100 MB)",
    )
    tiny.set_defaults(handler=_make_tiny)
    models.set_defaults(handler=lambda args: (models.print_help(), 2)[1])


def _check(args: argparse.Namespace) -> int:
    document = check_document(args.model_dir, args.device, load=args.load)
    if args.json:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        _print_report(document)
    return 0 if document["ok"] else 1


def _print_report(document: dict[str, Any]) -> None:
    out = sys.stdout
    out.write(f"model dir: {document['model_dir']}\n")
    parsing = document.get("face_parsing") or {"files": []}
    for entry in document["files"] + parsing["files"]:
        size = f"{entry['size_bytes'] / 1e6:10.1f} MB" if entry["exists"] else "   missing   "
        out.write(f"  {size}  {entry['role']:<22} {entry['path']}\n")
    variants = document.get("variants") or {}
    if variants:
        out.write("layout: " + ", ".join(f"{role} in {name}/" for role, name in variants.items()) + "\n")
    face_box = document.get("face_box")
    if face_box:
        present = "present, " if face_box["dwpose_present"] else ""
        out.write(f"face box: {face_box['source']} ({face_box['detail']}; DWPose {present}not used)\n")
        landmark_model = face_box.get("landmark_model") or {}
        if landmark_model:
            out.write(f"landmark model: {landmark_model['detail']}\n")
            if landmark_model["usable"]:
                out.write(f"  licence: {landmark_model['licence']}\n")
    if parsing.get("files"):
        mask = parsing["blend_mask"]
        why = "face-parsing weights present" if parsing["usable"] else "no usable face-parsing weights"
        out.write(f"blend mask: {mask} ({why})\n")
    device = document["device"]
    if "error" in device:
        out.write(f"device: unavailable ({device['error']})\n")
    else:
        out.write(f"device: {device['device']} {device['dtype']} ({device['reason']})\n")
    if "load" in document:
        load = document["load"]
        loaded = (
            f"ok in {load['ms']} ms; {load['blend_mask']}"
            if load["ok"]
            else f"{load['code']}: {load['message']}"
        )
        out.write(f"load: {loaded}\n")
    if document["problems"]:
        out.write("problems:\n")
        for problem in document["problems"]:
            out.write(f"  [{problem['code']}] {problem['message']}\n")
    else:
        out.write("no problems: the MuseTalk v1.5 files are complete and valid\n")
    out.write(f"engine=auto would use: {document['engine_auto_would_use']}\n")


def _make_tiny(args: argparse.Namespace) -> int:
    layout = write_checkpoint(args.model_dir, "tiny", seed=args.seed)
    if not args.no_face_parse:
        write_random_face_parse(layout, seed=args.seed)
    sys.stdout.write(f"wrote a tiny random MuseTalk v1.5 checkpoint to {layout.root}\n")
    return 0
