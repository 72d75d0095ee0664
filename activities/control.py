"""Control-plane activities (shared queue `lipsync-control`, retried per policy).

fetch_assets → validate_assets → place_session ... release_slot. Any control worker can
run them; the assets land in that worker's content-addressed store (`asset_dir`), which
sidecars read directly when it is shared storage and re-download (same guard, digest
checked) when it is not.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temporalio import activity

from activities import fetch, validate
from activities.errors import AssetError, to_application_error
from activities.placement_client import Placer
from workflows.contracts import (
    CONTROL_TASK_QUEUE,
    PLACEMENT_WORKFLOW_ID,
    ActivityName,
    AvatarKind,
    FetchAssetsInput,
    FetchedAsset,
    Placement,
    PlaceSessionInput,
    ReleaseSlotInput,
    ValidateAssetsInput,
    ValidatedAvatar,
)
from workflows.policy import FrameLimits, VideoLimits, ZipLimits

logger = logging.getLogger(__name__)

ASSET_SUFFIXES = {AvatarKind.FRAMES_ZIP: ".zip", AvatarKind.IDLE_VIDEO: ".video"}
# Validation reports this worker remembers (least recently used first out); each is a few hundred bytes.
VALIDATED_CACHE_ENTRIES = 1024
# What a validation report depends on: the content (sha256 of the stored file), its kind and the limits.
ValidationKey = tuple[str, AvatarKind, ZipLimits, FrameLimits, VideoLimits]


@dataclass(frozen=True)
class ControlConfig:
    asset_dir: Path
    asset_store_max_bytes: int = field(default_factory=fetch.asset_store_max_bytes)
    placement_workflow_id: str = PLACEMENT_WORKFLOW_ID
    task_queue: str = CONTROL_TASK_QUEUE
    shards: int = 1  # placement registries per pool; every sidecar and control worker must agree


class ControlActivities:
    def __init__(self, config: ControlConfig) -> None:
        self.config = config
        # A cached avatar's validation is not repeated: the same bytes (digest) under the same limits
        # give the same report. Only accepted assets are remembered (a refused one leaves the store).
        self._validated: OrderedDict[ValidationKey, validate.FramesReport] = OrderedDict()
        self._placer_cached: Placer | None = None

    def definitions(self) -> Sequence[Callable[..., Any]]:
        return [self.fetch_assets, self.validate_assets, self.place_session, self.release_slot]

    @activity.defn(name=ActivityName.FETCH_ASSETS.value)
    async def fetch_assets(self, request: FetchAssetsInput) -> FetchedAsset:
        try:
            result = await fetch.download(
                request.source.url,
                request.limits,
                self.config.asset_dir,
                suffix=ASSET_SUFFIXES[request.source.kind],
            )
        except AssetError as exc:
            logger.warning("asset refused", extra={"session": request.session_id, "code": exc.code.value})
            raise to_application_error(exc) from exc
        await asyncio.to_thread(
            fetch.keep_within_cap, result.path, self.config.asset_dir, self.config.asset_store_max_bytes
        )
        return FetchedAsset(
            source_url=request.source.url,
            final_url=result.final_url,
            kind=request.source.kind,
            digest_sha256=result.digest_sha256,
            size_bytes=result.size_bytes,
            stored_path=str(result.path),
        )

    @activity.defn(name=ActivityName.VALIDATE_ASSETS.value)
    async def validate_assets(self, request: ValidateAssetsInput) -> ValidatedAvatar:
        asset = request.asset
        path = Path(asset.stored_path)
        key: ValidationKey = (asset.digest_sha256, asset.kind, request.zip, request.frames, request.video)
        report = self._validated.get(key)
        if report is not None:
            self._validated.move_to_end(key)
            return _validated(asset, report)
        try:
            # Decoding is CPU work: off the event loop so this worker keeps polling and heartbeating.
            if asset.kind is AvatarKind.FRAMES_ZIP:
                report = await asyncio.to_thread(
                    validate.validate_frames_zip,
                    path,
                    request.zip,
                    request.frames,
                )
            else:
                report = await asyncio.to_thread(
                    validate.validate_idle_video,
                    path,
                    request.video,
                    request.frames,
                )
        except AssetError as exc:
            logger.warning("asset invalid", extra={"session": request.session_id, "code": exc.code.value})
            # A refused asset is never used: it leaves the store at once (a retry downloads it again).
            await asyncio.to_thread(path.unlink, missing_ok=True)
            raise to_application_error(exc) from exc
        self._validated[key] = report
        while len(self._validated) > VALIDATED_CACHE_ENTRIES:
            self._validated.popitem(last=False)
        return _validated(asset, report)

    @activity.defn(name=ActivityName.PLACE_SESSION.value)
    async def place_session(self, request: PlaceSessionInput) -> Placement:
        info = activity.info()
        placer = self._placer()
        # The registry refuses this acquire once this attempt is over (server time on both sides).
        deadline_s = (
            (info.started_time + info.start_to_close_timeout).timestamp()
            if info.start_to_close_timeout
            else 0.0
        )
        # A re-placement frees its previous slot where it was held (and marks the lost sidecar suspect
        # there); a retried attempt may have landed anywhere, so it clears every registry of its pools.
        if info.attempt == 1 and request.previous_registry_id:
            await placer.release(
                request.session_id,
                request.previous_registry_id,
                suspect_incarnations=request.exclude_incarnations,
            )
        return await placer.acquire(
            request.session_id,
            request.avatar_key,
            request.exclude_incarnations,
            pools=request.pools,
            release_first=info.attempt > 1
            or (bool(request.exclude_incarnations) and not request.previous_registry_id),
            deadline_s=deadline_s,
        )

    @activity.defn(name=ActivityName.RELEASE_SLOT.value)
    async def release_slot(self, request: ReleaseSlotInput) -> bool:
        return await self._placer().release(request.session_id, request.registry_id, pools=request.pools)

    def _placer(self) -> Placer:
        # One Placer for the worker's life: concurrent placements for the same registry share its batches.
        client = activity.client()
        if self._placer_cached is None or self._placer_cached.client is not client:
            self._placer_cached = Placer(
                client,
                self.config.placement_workflow_id,
                self.config.task_queue,
                shards=self.config.shards,
            )
        return self._placer_cached


def _validated(asset: FetchedAsset, report: validate.FramesReport) -> ValidatedAvatar:
    return ValidatedAvatar(
        asset=asset,
        frame_count=report.frame_count,
        width_px=report.width_px,
        height_px=report.height_px,
        face=report.face,
        fps=report.fps,
    )
