"""activities.fetch.download against a real loopback HTTP server: limits, redirects, codes, no debris."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from activities.errors import AssetError
from activities.fetch import download
from tests.support.asset_server import AssetServer, Route
from workflows.contracts import ErrorCode
from workflows.policy import FetchLimits, SessionPolicy


@pytest.fixture
def limits(policy: SessionPolicy) -> FetchLimits:
    return dataclasses.replace(policy.assets.fetch, max_bytes=64_000, total_timeout_s=2.0, read_timeout_s=0.5)


def debris(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".partial"))


async def test_download_is_content_addressed_and_follows_checked_redirects(
    asset_server: AssetServer, limits: FetchLimits, tmp_path: Path
) -> None:
    body = b"avatar bytes " * 1000
    target = asset_server.serve("/store/a.zip", body)
    url = asset_server.redirect("/short/a", "/store/a.zip", status=301)
    result = await download(url, limits, tmp_path, suffix=".zip")
    assert result.digest_sha256 == hashlib.sha256(body).hexdigest()
    assert result.path == tmp_path / f"{result.digest_sha256}.zip" and result.path.read_bytes() == body
    assert result.size_bytes == len(body) and result.final_url == target
    assert debris(tmp_path) == []


@pytest.mark.parametrize(
    ("route", "code", "retryable"),
    [
        (Route(status=404, body=b"nope"), ErrorCode.ASSET_HTTP_ERROR, False),
        (Route(status=503, body=b"busy"), ErrorCode.ASSET_HTTP_ERROR, True),
        (Route(status=429, body=b"slow down"), ErrorCode.ASSET_HTTP_ERROR, True),
        (Route(body=b""), ErrorCode.ASSET_EMPTY, False),
        (Route(body=bytes(100_000)), ErrorCode.ASSET_TOO_LARGE, False),  # declared
        (
            Route(body=bytes(100_000), send_length=False),
            ErrorCode.ASSET_TOO_LARGE,
            False,
        ),  # counted while streaming
        (
            Route(body=b"x" * 100, headers=(("Content-Encoding", "gzip"),)),
            ErrorCode.ASSET_ENCODING_UNSUPPORTED,
            False,
        ),
        (
            Route(body=bytes(4000), chunk_bytes=100, chunk_delay_s=0.1),
            ErrorCode.ASSET_TOO_SLOW,
            False,
        ),  # total
        (
            Route(body=bytes(400), chunk_bytes=200, chunk_delay_s=1.5),
            ErrorCode.ASSET_TOO_SLOW,
            False,
        ),  # stall
        (Route(status=302), ErrorCode.ASSET_HTTP_ERROR, False),  # redirect without Location
    ],
    ids=[
        "404",
        "503",
        "429",
        "empty",
        "too-large-declared",
        "too-large-streamed",
        "gzip",
        "too-slow",
        "stall",
        "redirect-without-location",
    ],
)
async def test_refusals_carry_their_code(
    asset_server: AssetServer,
    limits: FetchLimits,
    tmp_path: Path,
    *,
    route: Route,
    code: ErrorCode,
    retryable: bool,
) -> None:
    url = asset_server.add(f"/case-{code.value}-{id(route)}", route)
    with pytest.raises(AssetError) as refused:
        await download(url, limits, tmp_path, suffix=".zip")
    assert refused.value.code is code and refused.value.retryable is retryable, refused.value
    assert debris(tmp_path) == []  # a refused download leaves nothing behind


@pytest.mark.parametrize(
    ("location", "code"),
    [
        ("http://192.168.0.10/a.zip", ErrorCode.REDIRECT_FORBIDDEN_ADDRESS),
        ("http://[fe80::1]/a.zip", ErrorCode.REDIRECT_FORBIDDEN_ADDRESS),
        ("http://169.254.169.254/latest/meta-data/", ErrorCode.REDIRECT_FORBIDDEN_ADDRESS),
        ("file:///etc/passwd", ErrorCode.URL_INVALID),
        ("gopher://127.0.0.1:70/", ErrorCode.URL_INVALID),
        ("http://[::1", ErrorCode.URL_INVALID),  # unparsable: refused with a code, not an httpx exception
    ],
)
async def test_every_redirect_hop_is_checked(
    asset_server: AssetServer, limits: FetchLimits, tmp_path: Path, location: str, code: ErrorCode
) -> None:
    url = asset_server.redirect(f"/hop-{abs(hash(location))}", location)
    with pytest.raises(AssetError) as refused:
        await download(url, limits, tmp_path, suffix=".zip")
    assert refused.value.code is code and not refused.value.retryable, refused.value


async def test_redirect_count_is_bounded(
    asset_server: AssetServer, limits: FetchLimits, tmp_path: Path
) -> None:
    asset_server.serve("/end.zip", b"ok")
    for index in range(3):
        asset_server.redirect(f"/chain{index}", f"/chain{index + 1}")
    asset_server.redirect("/chain3", "/end.zip")
    tight = dataclasses.replace(limits, max_redirects=3)
    with pytest.raises(AssetError) as refused:
        await download(asset_server.url("/chain0"), tight, tmp_path, suffix=".zip")
    assert refused.value.code is ErrorCode.TOO_MANY_REDIRECTS
    result = await download(
        asset_server.url("/chain1"), tight, tmp_path, suffix=".zip"
    )  # exactly 3 hops: fine
    assert result.path.read_bytes() == b"ok"
