"""Prebuilt engine artifacts: the compiled kernels of a warm engine, saved once and loaded at the next
warm-up.

A cold compile of the full-size engine takes minutes (the compiled graphs of every stage, the Triton kernels
and their tuned launch configurations). `lipsync engine build` warms an engine up once and saves torch's
portable compile cache (`torch.compiler.save_cache_artifacts`) as an artifact; a sidecar's warm-up loads it
(`torch.compiler.load_cache_artifacts`) before the first compile, so the compiles hit the cache.

Compiled kernels are only valid for what they were compiled for. An artifact is keyed by everything that
changes the generated code: the GPU (name and compute capability), torch, CUDA and Triton versions, the model
architecture (a hash of the modules' structure, not the weights, which are inputs of the compiled graphs), the
dtype, the compile mode and the engine's compile settings (buckets, layouts, tuned stages, ...). Artifacts
live under `<root>/<key digest>/` (`manifest.json` + `cache.bin`), so nodes of different GPUs or versions can
share a root. Loading checks the manifest's key field by field and the blob's SHA-256: an artifact that does
not match is refused with `EngineArtifactMismatch` / `EngineArtifactCorrupt` (a logged code and sentence that
names the differing fields), the warm-up then compiles from nothing and saves a new artifact: never silently
slow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from realtime.engine.errors import EngineError

logger = logging.getLogger(__name__)

ARTIFACT_FORMAT = 1  # the layout of an artifact directory; part of the key
MANIFEST_NAME = "manifest.json"
BLOB_NAME = "cache.bin"


class EngineArtifactError(EngineError):
    code = "engine_artifact_error"


class EngineArtifactMissing(EngineArtifactError):
    code = "engine_artifact_missing"


class EngineArtifactMismatch(EngineArtifactError):
    code = "engine_artifact_mismatch"

    def __init__(self, message: str, differences: dict[str, tuple[object, object]]) -> None:
        super().__init__(message)
        self.differences = differences  # field -> (artifact's value, this process's value)


class EngineArtifactCorrupt(EngineArtifactError):
    code = "engine_artifact_corrupt"


@dataclass(frozen=True)
class ArtifactKey:
    """What compiled kernels depend on. Two processes with equal keys can share compiled kernels."""

    gpu_name: str  # e.g. "NVIDIA H200"
    gpu_capability: str  # e.g. "9.0"
    torch_version: str
    cuda_version: str
    triton_version: str
    model_hash: str  # the models' architecture (module structure and parameter shapes), not their weights
    dtype: str
    compile_mode: str
    compile_settings: str  # canonical JSON of the engine's settings that change the compiled code
    batch_buckets: tuple[int, ...]
    format: int = ARTIFACT_FORMAT

    def digest(self) -> str:
        """A short stable name for the key (the artifact's directory)."""
        return hashlib.sha256(_canonical(self.to_json())).hexdigest()[:24]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["batch_buckets"] = list(self.batch_buckets)
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> ArtifactKey:
        names = {f.name for f in fields(ArtifactKey)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data) - {"format"})
        if unknown or missing:
            raise EngineArtifactCorrupt(
                f"engine artifact manifest has unknown fields {unknown} or lacks fields {missing}"
            )
        values = dict(data)
        values["batch_buckets"] = tuple(int(b) for b in values["batch_buckets"])
        return ArtifactKey(**values)

    def differences(self, other: ArtifactKey) -> dict[str, tuple[object, object]]:
        """Fields whose values differ: name -> (self's value, other's value)."""
        mine, theirs = self.to_json(), other.to_json()
        return {name: (mine[name], theirs[name]) for name in mine if mine[name] != theirs[name]}


def _canonical(data: object) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def model_hash(*modules: Any) -> str:
    """A hash of modules' architecture: their printed structure and every parameter's and buffer's name,
    shape and dtype. Weight values are inputs of the compiled graphs and do not change the generated
    kernels."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(repr(module).encode())
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return digest.hexdigest()[:24]


def settings_json(settings: dict[str, Any]) -> str:
    return _canonical(settings).decode()


@dataclass(frozen=True)
class LoadedArtifact:
    key: ArtifactKey
    path: Path  # the artifact's directory
    blob: bytes


def artifact_dir(root: Path, key: ArtifactKey) -> Path:
    return root / key.digest()


def save_artifact(root: Path, key: ArtifactKey, blob: bytes, *, build_ms: float | None = None) -> Path:
    """Write `blob` (the portable compile cache) under `root/<key digest>/` with its manifest; atomic per
    file (a reader never sees a half-written artifact: the manifest, which names the blob's hash, is written
    last)."""
    if not blob:
        raise EngineArtifactError("nothing to save: the compile cache is empty (was anything compiled?)")
    directory = artifact_dir(root, key)
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / BLOB_NAME, blob)
    manifest = {
        "key": key.to_json(),
        "blob_sha256": hashlib.sha256(blob).hexdigest(),
        "blob_bytes": len(blob),
        "build_ms": None if build_ms is None else round(build_ms, 1),
    }
    _write_atomic(directory / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True).encode())
    logger.info(
        "engine artifact saved",
        extra={"path": str(directory), "bytes": len(blob), "key_digest": key.digest()},
    )
    return directory


def _write_atomic(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_artifact(directory: Path, expected: ArtifactKey) -> LoadedArtifact:
    """The artifact in `directory`, checked against `expected`.

    Raises EngineArtifactMissing (no artifact there), EngineArtifactMismatch (built for something else: the
    message names each differing field with both values) or EngineArtifactCorrupt (unreadable manifest, or a
    blob whose size or SHA-256 is not the manifest's)."""
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise EngineArtifactMissing(f"no engine artifact at {directory} (run `lipsync engine build`)")
    try:
        manifest = json.loads(manifest_path.read_text())
        key = ArtifactKey.from_json(manifest["key"])
        blob_sha256, blob_bytes = str(manifest["blob_sha256"]), int(manifest["blob_bytes"])
    except EngineArtifactCorrupt:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EngineArtifactCorrupt(f"engine artifact manifest {manifest_path} is unreadable: {exc}") from exc
    differences = key.differences(expected)
    if differences:
        listed = "; ".join(
            f"{name}: artifact {a!r}, here {b!r}" for name, (a, b) in sorted(differences.items())
        )
        raise EngineArtifactMismatch(
            f"engine artifact {directory} was built for a different engine ({listed}); it is not loaded",
            differences,
        )
    try:
        blob = (directory / BLOB_NAME).read_bytes()
    except OSError as exc:
        raise EngineArtifactCorrupt(
            f"engine artifact {directory} has no readable {BLOB_NAME}: {exc}"
        ) from exc
    if len(blob) != blob_bytes or hashlib.sha256(blob).hexdigest() != blob_sha256:
        raise EngineArtifactCorrupt(
            f"engine artifact {directory / BLOB_NAME} is {len(blob)} bytes whose SHA-256 is not the "
            f"manifest's ({blob_bytes} bytes): a partial copy or a changed file; it is not loaded"
        )
    return LoadedArtifact(key, directory, blob)


def find_artifact(root: Path, expected: ArtifactKey) -> LoadedArtifact:
    """The artifact for `expected` under `root` (its digest's directory); see `read_artifact` for the errors.

    When there is none but `root` holds artifacts built for something else (another GPU, torch version,
    model or setting), the refusal names how the closest of them differs (EngineArtifactMismatch), so a
    deployment that shipped the wrong artifacts says so instead of only compiling for minutes."""
    directory = artifact_dir(root, expected)
    if (directory / MANIFEST_NAME).is_file() or not root.is_dir():
        return read_artifact(directory, expected)
    closest: EngineArtifactMismatch | None = None
    for candidate in sorted(root.iterdir()):
        if not (candidate / MANIFEST_NAME).is_file():
            continue
        try:
            read_artifact(candidate, expected)
        except EngineArtifactMismatch as exc:
            if closest is None or len(exc.differences) < len(closest.differences):
                closest = exc
        except EngineArtifactError:
            continue
    if closest is not None:
        raise closest
    return read_artifact(directory, expected)


@dataclass(frozen=True)
class PrebuiltWarmUp:
    """How a warm-up used the prebuilt artifacts."""

    # "loaded" | "built" (none there) | "rebuilt" (one was refused) | "not_compiled" (nothing to load) |
    # "deferred" (serving uncompiled graphs; the compile runs in the background: `serving_state()`)
    status: str
    warm_up_ms: float  # the warm-up itself (compiles, captures, timed runs)
    load_ms: float = 0.0  # reading, checking and loading the artifact
    save_ms: float = 0.0
    path: Path | None = None  # the artifact loaded or saved
    refused: str = ""  # the refusal's code and sentence ("rebuilt")
    cache_misses: int = 0  # graphs compiled from nothing despite a loaded artifact (its key missed something)


def warm_up_with_artifacts(
    root: Path,
    key: ArtifactKey,
    *,
    warm_up: Callable[[], float],
    load_blob: Callable[[bytes], object],
    save_blob: Callable[[], bytes | None],
    cache_misses: Callable[[], int] = lambda: 0,
    rebuild: bool = False,
) -> PrebuiltWarmUp:
    """Load the artifact for `key` (if any, and only if it matches), run `warm_up`, and save a new artifact
    when none was loaded or when compiles still missed the cache. `load_blob` / `save_blob`: torch's
    `load_cache_artifacts` / `save_cache_artifacts` (bytes); `cache_misses`: compiled graphs not found in
    the cache so far in this process (inductor's counter); `rebuild`: do not look for one (`lipsync engine
    build`)."""
    started = time.perf_counter()
    status, loaded_path, refused = "built", None, ""
    try:
        if rebuild:
            raise EngineArtifactMissing("a rebuild was asked for")
        loaded = find_artifact(root, key)
    except EngineArtifactMissing:
        logger.info("no prebuilt engine artifact: compiling from nothing", extra={"root": str(root)})
    except EngineArtifactError as exc:
        status, refused = "rebuilt", str(exc)
        logger.warning(
            "engine artifact refused: compiling from nothing", extra={"code": exc.code, "reason": str(exc)}
        )
    else:
        load_blob(loaded.blob)
        status, loaded_path = "loaded", loaded.path
        logger.info("engine artifact loaded", extra={"path": str(loaded.path), "bytes": len(loaded.blob)})
    load_ms = (time.perf_counter() - started) * 1000.0
    misses_before = cache_misses()
    warm_ms = warm_up()
    misses = cache_misses() - misses_before if status == "loaded" else 0
    if misses:
        logger.warning(
            "engine artifact loaded but graphs were still compiled from nothing: saving a new one",
            extra={"code": "engine_artifact_incomplete", "cache_misses": misses, "path": str(loaded_path)},
        )
    if status == "loaded" and not misses:
        return PrebuiltWarmUp(status, warm_ms, load_ms, path=loaded_path)
    save_started = time.perf_counter()
    blob = save_blob()
    path = save_artifact(root, key, blob, build_ms=warm_ms) if blob else None
    save_ms = (time.perf_counter() - save_started) * 1000.0
    return PrebuiltWarmUp(status, warm_ms, load_ms, save_ms, path, refused, misses)


def default_artifacts_root() -> Path:
    configured = os.environ.get("LIPSYNC_CACHE_DIR")
    base = Path(configured) if configured else Path.home() / ".cache" / "lipsync-live"
    return base / "engine-artifacts"
