"""ControlActivities.validate_assets remembers accepted avatars by digest and limits (a cached avatar's
start)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError

from activities.control import ControlActivities, ControlConfig
from tests.support import media
from workflows.contracts import AvatarKind, ErrorCode, FetchedAsset, ValidateAssetsInput
from workflows.policy import SessionPolicy


def stored(tmp_path: Path, data: bytes) -> FetchedAsset:
    digest = hashlib.sha256(data).hexdigest()
    path = tmp_path / f"{digest}.zip"
    path.write_bytes(data)
    return FetchedAsset(
        source_url="http://assets.test/a.zip",
        final_url="http://assets.test/a.zip",
        kind=AvatarKind.FRAMES_ZIP,
        digest_sha256=digest,
        size_bytes=len(data),
        stored_path=str(path),
    )


def overwrite(asset: FetchedAsset, data: bytes) -> None:
    Path(asset.stored_path).write_bytes(data)


def in_store(asset: FetchedAsset) -> bool:
    return Path(asset.stored_path).exists()


def request(policy: SessionPolicy, asset: FetchedAsset) -> ValidateAssetsInput:
    assets = policy.assets
    return ValidateAssetsInput("s-1", asset, assets.zip, assets.frames, assets.video)


async def test_same_digest_and_limits_is_not_validated_again(policy: SessionPolicy, tmp_path: Path) -> None:
    activities = ControlActivities(ControlConfig(asset_dir=tmp_path))
    asset = stored(tmp_path, media.frames_zip(count=6, side_px=96))
    first = await activities.validate_assets(request(policy, asset))
    assert (first.frame_count, first.width_px, first.face is not None) == (6, 96, True)
    # The stored bytes are what the digest names; overwrite them to prove the second answer is the cached one.
    overwrite(asset, b"not a zip any more")
    assert await activities.validate_assets(request(policy, asset)) == first


async def test_other_limits_validate_again(policy: SessionPolicy, tmp_path: Path) -> None:
    activities = ControlActivities(ControlConfig(asset_dir=tmp_path))
    asset = stored(tmp_path, media.frames_zip(count=6, side_px=96))
    await activities.validate_assets(request(policy, asset))
    stricter = dataclasses.replace(
        request(policy, asset), frames=dataclasses.replace(policy.assets.frames, max_frames=3)
    )
    with pytest.raises(ApplicationError) as failure:
        await activities.validate_assets(stricter)
    assert failure.value.type == ErrorCode.TOO_MANY_FRAMES


async def test_a_refused_asset_is_not_remembered(policy: SessionPolicy, tmp_path: Path) -> None:
    activities = ControlActivities(ControlConfig(asset_dir=tmp_path))
    asset = stored(tmp_path, b"not a zip")
    for _ in range(2):  # refused each time, from the bytes (the store drops the file after a refusal)
        overwrite(asset, b"not a zip")
        with pytest.raises(ApplicationError) as failure:
            await activities.validate_assets(request(policy, asset))
        assert failure.value.type == ErrorCode.NOT_A_ZIP
        assert not in_store(asset)
