"""Prebuilt engine artifacts: keyed by what compiled kernels depend on, refused with a code when they do not
match,
rebuilt and saved then (`realtime.engine.artifacts`, `lipsync engine build`)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from infra.cli import main as lipsync
from realtime.engine.artifacts import (
    BLOB_NAME,
    MANIFEST_NAME,
    ArtifactKey,
    EngineArtifactCorrupt,
    EngineArtifactMismatch,
    EngineArtifactMissing,
    PrebuiltWarmUp,
    find_artifact,
    model_hash,
    read_artifact,
    save_artifact,
    settings_json,
    warm_up_with_artifacts,
)

H200 = ArtifactKey(
    gpu_name="NVIDIA H200",
    gpu_capability="9.0",
    torch_version="2.11.0+cu130",
    cuda_version="13.0",
    triton_version="3.5.0",
    model_hash="a1b2c3",
    dtype="float16",
    compile_mode="default",
    compile_settings=settings_json({"compile_channels_last": True, "compile_tuned_stages": ["vae_decode"]}),
    batch_buckets=(1, 2, 4, 8, 16, 32, 48, 64),
)
H100 = dataclasses.replace(H200, gpu_name="NVIDIA H100 80GB HBM3")


class FakeCompiler:
    """Stands in for torch.compiler's cache calls and inductor's miss counter: what the warm-up would do."""

    def __init__(self, blob: bytes = b"compiled kernels", misses_per_warm_up: int = 0) -> None:
        self.blob = blob
        self.loaded: list[bytes] = []
        self.warm_ups = 0
        self.saves = 0
        self.misses = 0
        self.misses_per_warm_up = misses_per_warm_up

    def warm_up(self) -> float:
        self.warm_ups += 1
        self.misses += self.misses_per_warm_up
        return 1234.0

    def save(self) -> bytes:
        self.saves += 1
        return self.blob

    def run(self, root: Path, key: ArtifactKey, **options: bool) -> PrebuiltWarmUp:
        return warm_up_with_artifacts(
            root,
            key,
            warm_up=self.warm_up,
            load_blob=self.loaded.append,
            save_blob=self.save,
            cache_misses=lambda: self.misses,
            **options,
        )


def test_every_field_of_the_key_names_a_different_artifact_and_the_key_round_trips() -> None:
    changes = {
        "gpu_name": "NVIDIA H100",
        "gpu_capability": "8.0",
        "torch_version": "2.12.0",
        "cuda_version": "12.8",
        "triton_version": "3.6.0",
        "model_hash": "ffff",
        "dtype": "bfloat16",
        "compile_mode": "max-autotune-no-cudagraphs",
        "compile_settings": settings_json({}),
        "batch_buckets": (1, 2, 4),
        "format": 2,
    }
    assert set(changes) == {f.name for f in dataclasses.fields(ArtifactKey)}
    digests = {dataclasses.replace(H200, **{name: value}).digest() for name, value in changes.items()}  # type: ignore[arg-type]
    assert len(digests) == len(changes) and H200.digest() not in digests
    assert ArtifactKey.from_json(json.loads(json.dumps(H200.to_json()))) == H200
    assert H200.digest() == dataclasses.replace(H200).digest()  # stable


def test_the_model_hash_follows_the_architecture_not_the_weights() -> None:
    torch = pytest.importorskip("torch")
    first, second = (
        torch.nn.Linear(4, 3),
        torch.nn.Linear(4, 3),
    )  # different random weights, same architecture
    assert model_hash(first) == model_hash(second)
    assert model_hash(first) != model_hash(torch.nn.Linear(4, 5))
    assert model_hash(first) != model_hash(first.to(torch.float16))


def test_a_saved_artifact_loads_for_its_own_key(tmp_path: Path) -> None:
    path = save_artifact(tmp_path, H200, b"kernels", build_ms=1000.0)
    assert path == tmp_path / H200.digest()
    loaded = find_artifact(tmp_path, H200)
    assert loaded.blob == b"kernels" and loaded.key == H200


def test_no_artifact_is_missing(tmp_path: Path) -> None:
    with pytest.raises(EngineArtifactMissing) as caught:
        find_artifact(tmp_path / "nothing-here", H200)
    assert caught.value.code == "engine_artifact_missing"
    assert "lipsync engine build" in caught.value.message


def test_an_artifact_built_for_another_gpu_is_refused_naming_the_difference(tmp_path: Path) -> None:
    save_artifact(tmp_path, H100, b"hopper kernels of another part")
    with pytest.raises(EngineArtifactMismatch) as caught:
        find_artifact(tmp_path, H200)
    assert caught.value.code == "engine_artifact_mismatch"
    assert caught.value.differences == {"gpu_name": ("NVIDIA H100 80GB HBM3", "NVIDIA H200")}
    assert "gpu_name: artifact 'NVIDIA H100 80GB HBM3', here 'NVIDIA H200'" in caught.value.message
    # Read directly (an artifact shipped to a fixed path) it is refused the same way.
    with pytest.raises(EngineArtifactMismatch):
        read_artifact(tmp_path / H100.digest(), H200)


def test_a_changed_or_partial_blob_is_refused_as_corrupt(tmp_path: Path) -> None:
    path = save_artifact(tmp_path, H200, b"kernels")
    (path / BLOB_NAME).write_bytes(b"kernelz")
    with pytest.raises(EngineArtifactCorrupt, match="SHA-256") as caught:
        find_artifact(tmp_path, H200)
    assert caught.value.code == "engine_artifact_corrupt"
    (path / MANIFEST_NAME).write_text("{ not json")
    with pytest.raises(EngineArtifactCorrupt, match="unreadable"):
        find_artifact(tmp_path, H200)


def test_warm_up_builds_and_saves_when_there_is_none_then_loads_it(tmp_path: Path) -> None:
    compiler = FakeCompiler()
    first = compiler.run(tmp_path, H200)
    assert first.status == "built" and compiler.saves == 1 and compiler.loaded == []
    second = compiler.run(tmp_path, H200)
    assert second.status == "loaded" and second.path == tmp_path / H200.digest()
    assert compiler.loaded == [b"compiled kernels"]
    assert compiler.saves == 1  # nothing new to save
    assert compiler.warm_ups == 2  # the warm-up always runs: the loaded kernels make it fast


def test_a_mismatched_artifact_is_refused_with_a_logged_code_and_rebuilt_beside_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_artifact(tmp_path, H100, b"kernels for another gpu")
    compiler = FakeCompiler()
    with caplog.at_level(logging.WARNING, logger="realtime.engine.artifacts"):
        report = compiler.run(tmp_path, H200)
    assert report.status == "rebuilt"
    assert report.refused.startswith("[engine_artifact_mismatch]")
    assert compiler.loaded == []  # never loaded
    refusals = [r for r in caplog.records if getattr(r, "code", None) == "engine_artifact_mismatch"]
    assert refusals and "gpu_name" in getattr(refusals[0], "reason", "")
    # The rebuilt artifact sits beside the other GPU's: each node finds its own.
    assert find_artifact(tmp_path, H200).blob == b"compiled kernels"
    assert read_artifact(tmp_path / H100.digest(), H100).blob == b"kernels for another gpu"


def test_a_corrupt_artifact_is_rebuilt_and_replaced(tmp_path: Path) -> None:
    path = save_artifact(tmp_path, H200, b"kernels")
    (path / BLOB_NAME).write_bytes(b"truncated")
    compiler = FakeCompiler(blob=b"fresh kernels")
    report = compiler.run(tmp_path, H200)
    assert report.status == "rebuilt" and "engine_artifact_corrupt" in report.refused
    assert find_artifact(tmp_path, H200).blob == b"fresh kernels"


def test_a_loaded_artifact_that_still_leaves_compiles_is_reported_and_saved_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_artifact(tmp_path, H200, b"old kernels")
    compiler = FakeCompiler(blob=b"complete kernels", misses_per_warm_up=3)
    with caplog.at_level(logging.WARNING, logger="realtime.engine.artifacts"):
        report = compiler.run(tmp_path, H200)
    assert report.status == "loaded" and report.cache_misses == 3
    assert any(getattr(r, "code", None) == "engine_artifact_incomplete" for r in caplog.records)
    assert find_artifact(tmp_path, H200).blob == b"complete kernels"


def test_a_rebuild_does_not_look_for_an_artifact(tmp_path: Path) -> None:
    save_artifact(tmp_path, H200, b"old kernels")
    compiler = FakeCompiler(blob=b"new kernels")
    report = compiler.run(tmp_path, H200, rebuild=True)
    assert report.status == "built" and compiler.loaded == []
    assert find_artifact(tmp_path, H200).blob == b"new kernels"


def test_engine_build_on_a_cpu_engine_says_there_is_nothing_to_build(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = lipsync(
        [
            "engine",
            "build",
            "--device",
            "cpu",
            "--model-dir",
            str(tiny_model_dir),
            "--artifacts-dir",
            str(tmp_path),
            "--json",
        ]
    )
    document = json.loads(capsys.readouterr().out)
    assert code == 2
    assert document["code"] == "engine_artifact_nothing_to_build"
    assert "only on CUDA" in document["message"]
    assert not any(tmp_path.iterdir())
