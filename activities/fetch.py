"""Download an avatar asset: httpx streaming, byte/time limits, SSRF guard on every hop, sha256.

The file lands content-addressed (`<sha256><suffix>`) in a store directory, written to a
temporary name first and renamed, so a half-written download never looks complete and
two sessions with the same avatar share one file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpx

from activities.errors import AssetError
from activities.net_guard import AddressPolicy, resolve_checked
from realtime.disk_budget import evict_lru, touch
from workflows.contracts import ErrorCode
from workflows.policy import FetchLimits

logger = logging.getLogger(__name__)

USER_AGENT = "lipsync-live-asset-fetch/1"
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# 408/429 and 5xx may pass; other 4xx mean the URL is wrong and retrying cannot help.
_RETRYABLE_CLIENT_STATUSES = frozenset({408, 425, 429})
_INVALID_LOCATION = "Invalid URL in location header"  # httpx's RemoteProtocolError for an unparsable Location


@dataclass(frozen=True)
class Download:
    final_url: str
    digest_sha256: str
    size_bytes: int
    path: Path


async def download(url: str, limits: FetchLimits, store_dir: Path, *, suffix: str) -> Download:
    """Fetch `url` into `store_dir`; raises AssetError with a reason code for every refusal."""
    policy = AddressPolicy.from_cidrs(limits.allow_networks)
    timeout = httpx.Timeout(
        connect=limits.connect_timeout_s,
        read=limits.read_timeout_s,
        write=limits.read_timeout_s,
        pool=limits.connect_timeout_s,
    )
    await asyncio.to_thread(store_dir.mkdir, parents=True, exist_ok=True)
    # trust_env=False: an HTTP(S)_PROXY from the environment would connect on our behalf and
    # bypass the address check.
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        try:
            async with asyncio.timeout(limits.total_timeout_s):
                return await _follow(client, url, limits, policy, _Store(store_dir, suffix))
        except TimeoutError as exc:
            raise AssetError(
                ErrorCode.ASSET_TOO_SLOW,
                f"download of {url} did not finish within {limits.total_timeout_s:g} s",
            ) from exc


@dataclass(frozen=True)
class _Store:
    directory: Path
    suffix: str


async def _follow(
    client: httpx.AsyncClient, url: str, limits: FetchLimits, policy: AddressPolicy, store: _Store
) -> Download:
    current = _parse(url, ErrorCode.URL_INVALID, "asset URL")
    address_code = ErrorCode.URL_FORBIDDEN_ADDRESS
    what = "asset URL host"
    for hop in range(limits.max_redirects + 1):
        host = current.host
        port = current.port or (443 if current.scheme == "https" else 80)
        address = await resolve_checked(host, port, policy, code=address_code, what=f"{what} {host!r}")
        pinned = current.copy_with(host=str(address))
        headers = {
            "Host": current.netloc.decode("ascii"),
            "Accept-Encoding": "identity",
            "User-Agent": USER_AGENT,
        }
        extensions = {"sni_hostname": host} if current.scheme == "https" else {}
        try:
            async with client.stream("GET", pinned, headers=headers, extensions=extensions) as response:
                if response.status_code in _REDIRECT_STATUSES:
                    location = response.headers.get("location")
                    if not location:
                        raise AssetError(
                            ErrorCode.ASSET_HTTP_ERROR,
                            f"{current} answered {response.status_code} without a Location",
                        )
                    current = _parse(str(current.join(location)), ErrorCode.URL_INVALID, "redirect target")
                    address_code = ErrorCode.REDIRECT_FORBIDDEN_ADDRESS
                    what = f"redirect #{hop + 1} host"
                    continue
                return await _save(response, current, limits, store)
        except httpx.ReadTimeout as exc:
            raise AssetError(
                ErrorCode.ASSET_TOO_SLOW, f"{current}: no data for {limits.read_timeout_s:g} s (read timeout)"
            ) from exc
        except httpx.RemoteProtocolError as exc:
            if _INVALID_LOCATION in str(exc):
                # httpx parses Location itself (even without following): a bad one is the server's
                # permanent answer, not a transient failure worth retrying.
                raise AssetError(
                    ErrorCode.URL_INVALID,
                    f"{current} redirects to an invalid URL: {exc}",
                ) from exc
            raise AssetError(
                ErrorCode.ASSET_UNREACHABLE, f"{current}: {type(exc).__name__}: {exc}", retryable=True
            ) from exc
        except httpx.TransportError as exc:
            # connect/read/write/pool errors and timeouts: the network, maybe transient
            raise AssetError(
                ErrorCode.ASSET_UNREACHABLE, f"{current}: {type(exc).__name__}: {exc}", retryable=True
            ) from exc
    raise AssetError(ErrorCode.TOO_MANY_REDIRECTS, f"{url}: more than {limits.max_redirects} redirect(s)")


async def _save(response: httpx.Response, url: httpx.URL, limits: FetchLimits, store: _Store) -> Download:
    status = response.status_code
    if status != 200:
        retryable = status >= 500 or status in _RETRYABLE_CLIENT_STATUSES
        raise AssetError(ErrorCode.ASSET_HTTP_ERROR, f"{url} answered HTTP {status}", retryable=retryable)
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # We asked for identity; a compressed body would be inflated past any byte limit we check.
        raise AssetError(ErrorCode.ASSET_ENCODING_UNSUPPORTED, f"{url} sent Content-Encoding {encoding!r}")
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
        raise AssetError(
            ErrorCode.ASSET_TOO_LARGE,
            f"{url} declares {int(declared)} bytes; the limit is {limits.max_bytes}",
        )

    digest = hashlib.sha256()
    size = 0
    partial = store.directory / f".partial-{uuid.uuid4().hex}{store.suffix}"
    handle = await asyncio.to_thread(_open_for_write, partial)
    try:
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > limits.max_bytes:
                raise AssetError(ErrorCode.ASSET_TOO_LARGE, f"{url} sent more than {limits.max_bytes} bytes")
            digest.update(chunk)
            await asyncio.to_thread(handle.write, chunk)
        await asyncio.to_thread(handle.close)
        if size == 0:
            raise AssetError(ErrorCode.ASSET_EMPTY, f"{url} sent an empty body")
        final = store.directory / f"{digest.hexdigest()}{store.suffix}"
        await asyncio.to_thread(os.replace, partial, final)
    except BaseException:
        await asyncio.to_thread(_discard, handle, partial)
        raise
    logger.info("asset downloaded", extra={"url": str(url), "bytes": size, "sha256": digest.hexdigest()})
    return Download(final_url=str(url), digest_sha256=digest.hexdigest(), size_bytes=size, path=final)


def _parse(text: str, code: ErrorCode, what: str) -> httpx.URL:
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, ValueError) as exc:
        raise AssetError(code, f"{what} {text!r} is not a valid URL: {exc}") from exc
    if url.scheme not in ("http", "https"):
        raise AssetError(
            code,
            f"{what} {text!r}: only http and https are allowed, not {url.scheme or 'none'!r}",
        )
    if not url.host:
        raise AssetError(code, f"{what} {text!r} has no host")
    if url.userinfo:
        raise AssetError(
            code,
            f"{what} must not carry credentials (they would be stored in the session history)",
        )
    return url


ASSET_STORE_MAX_BYTES_ENV = "LIPSYNC_ASSET_STORE_MAX_BYTES"
DEFAULT_ASSET_STORE_MAX_BYTES = 4 << 30


def asset_store_max_bytes() -> int:
    """The asset stores' cap ($LIPSYNC_ASSET_STORE_MAX_BYTES, default 4 GiB): least recently used files go
    first."""
    return int(os.environ.get(ASSET_STORE_MAX_BYTES_ENV) or DEFAULT_ASSET_STORE_MAX_BYTES)


def keep_within_cap(path: Path, store_dir: Path, max_bytes: int) -> None:
    """`path` was just used: mark it recent, then evict the store's least recently used files past the cap."""
    touch(path)
    evict_lru(store_dir, max_bytes, keep={path})


def _open_for_write(path: Path) -> BinaryIO:
    return path.open("wb")


def _discard(handle: BinaryIO, path: Path) -> None:
    with contextlib.suppress(OSError):
        handle.close()
    with contextlib.suppress(OSError):
        path.unlink()


def sha256_of(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
