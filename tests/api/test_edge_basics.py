"""The API edge's contract: auth, error bodies, validation errors with field names, viewer tokens."""

from __future__ import annotations

import httpx
import pytest

from api.app import create_app
from api.settings import ApiSettings, SettingsError

SECRET = "test-secret-0123456789abcdef0123456789"
SETTINGS = ApiSettings(api_keys=("key-one", "key-two"), livekit_api_key="devkey", livekit_api_secret=SECRET)


@pytest.fixture
async def client() -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(SETTINGS))
    return httpx.AsyncClient(transport=transport, base_url="http://api.test")


async def test_token_requires_an_api_key(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/livekit/token", json={"room": "r1"})
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"
    assert "X-API-Key" in response.json()["message"]


async def test_wrong_api_key_is_rejected(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/livekit/token", json={"room": "r1"}, headers={"X-API-Key": "nope"})
    assert response.status_code == 401
    assert response.json() == {"code": "unauthorized", "message": "invalid API key"}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({}, "room"),
        ({"room": "bad room!"}, "room"),
        ({"room": "ok", "ttl_s": 5}, "ttl_s"),
        ({"room": 3}, "room"),
    ],
)
async def test_validation_errors_are_422_with_field_names(
    client: httpx.AsyncClient, payload: dict[str, object], field: str
) -> None:
    response = await client.post("/v1/livekit/token", json=payload, headers={"X-API-Key": "key-one"})
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "validation_error"
    assert field in [f["field"] for f in body["fields"]]
    assert field in body["message"]


async def test_malformed_json_is_a_422_not_a_crash(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/livekit/token",
        content=b"{not json",
        headers={"X-API-Key": "key-one", "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"


async def test_unknown_route_has_an_error_body(client: httpx.AsyncClient) -> None:
    response = await client.get("/nope")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


async def test_openapi_is_published(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert "/v1/livekit/token" in response.json()["paths"]


def test_settings_refuse_to_start_without_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIPSYNC_API_KEYS", raising=False)
    with pytest.raises(SettingsError, match="LIPSYNC_API_KEYS"):
        ApiSettings.from_env()
