"""The HTTP boundary of the error base: any LipsyncError answers with the status its code maps to."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from api.errors import HTTP_STATUS, ApiError, http_status
from api.settings import ApiSettings
from realtime.engine.errors import AvatarNoFace
from realtime.errors import LipsyncError

SECRET = "test-secret-0123456789abcdef0123456789"
SETTINGS = ApiSettings(api_keys=("key-one",), livekit_api_key="devkey", livekit_api_secret=SECRET)
API_DIR = Path(__file__).resolve().parents[2] / "api"


def _raise(error: LipsyncError) -> None:
    raise error


@pytest.fixture
async def client() -> httpx.AsyncClient:
    app = create_app(SETTINGS)
    app.add_api_route(
        "/test/exists",
        lambda: _raise(
            ApiError("session_exists", "session 's1' already exists", headers={"X-Trace-Id": "t1"})
        ),
    )
    app.add_api_route("/test/engine", lambda: _raise(AvatarNoFace("no face in frame 3")))
    app.add_api_route(
        "/test/retry", lambda: _raise(ApiError("temporal_unavailable", "cannot reach Temporal"))
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test")


async def test_an_api_error_answers_with_its_codes_status_and_body(client: httpx.AsyncClient) -> None:
    response = await client.get("/test/exists")
    assert response.status_code == 409
    assert response.json() == {"code": "session_exists", "message": "session 's1' already exists"}
    assert response.headers["X-Trace-Id"] == "t1"
    response = await client.get("/test/retry")
    assert response.status_code == 503 and response.json()["code"] == "temporal_unavailable"


async def test_a_lower_layers_error_keeps_its_code_and_is_a_logged_500(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="api.errors"):
        response = await client.get("/test/engine")
    assert response.status_code == 500
    assert response.json() == {"code": "avatar_no_face", "message": "no face in frame 3"}
    assert any(record.exc_info and record.exc_info[0] is AvatarNoFace for record in caplog.records)


def _codes_raised_in_api() -> set[str]:
    """Literal codes of every `ApiError(...)` and middleware `_refuse(...)` in the api package."""
    codes: set[str] = set()
    for path in API_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            literals = [
                a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
            ]
            if node.func.id in ("ApiError", "_refuse") and literals:
                codes.add(literals[0])
    return codes


def test_every_code_the_api_raises_has_a_status() -> None:
    codes = _codes_raised_in_api()
    assert {"not_found", "session_exists", "unauthorized", "body_too_large"} <= codes, codes
    missing = sorted(code for code in codes if code not in HTTP_STATUS)
    assert not missing, f"codes raised in api/ without an HTTP status in api.errors.HTTP_STATUS: {missing}"
    assert all(400 <= http_status(code) < 600 for code in codes)
    assert http_status("a_code_nobody_mapped") == 500
