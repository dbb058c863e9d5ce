"""The API key middleware, in process: what it lets through, what it answers, and what it forwards."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from exo.api.auth import ApiKeyMiddleware, forward_headers, sending_api_key

KEY = "sk-test-key"


def app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(ApiKeyMiddleware, api_key=KEY)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/")
    async def dashboard() -> str:
        return "page"

    @app.get("/dashboard/app.js")
    async def script() -> str:
        return "code"

    @app.post("/cluster/message")
    async def message() -> None:
        return None

    @app.get("/v1/models")
    async def models() -> dict[str, dict[str, str]]:
        return {"sends": forward_headers()}  # what a node-to-node call from this handler would send

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"secret data"
        return StreamingResponse(body())

    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app()), base_url="http://node") as client:
        yield client


@pytest.mark.parametrize("path", ["/v1/models", "/stream", "/docs", "/openapi.json", "/no/such/path"])
@pytest.mark.parametrize(("auth", "code"), [(None, "missing_api_key"), ("Bearer wrong", "invalid_api_key"),
                                            (f"Basic {KEY}", "invalid_api_key"), ("Bearer", "invalid_api_key")])
async def test_requests_without_the_key_get_401_in_openai_shape(client: httpx.AsyncClient, path: str,
                                                                auth: str | None, code: str) -> None:
    response = await client.get(path, headers={"Authorization": auth} if auth else {})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error == {"message": error["message"], "type": "invalid_request_error", "param": None, "code": code}
    if code == "missing_api_key":
        assert "Authorization: Bearer" in error["message"] and "--api-key" in error["message"]


async def test_the_key_opens_every_endpoint_and_is_sent_on(client: httpx.AsyncClient) -> None:
    for scheme in ("Bearer", "bearer"):
        response = await client.get("/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
        assert response.status_code == 200
        assert response.json() == {"sends": {"Authorization": f"Bearer {KEY}"}}
    streamed = await client.get("/stream", headers={"Authorization": f"Bearer {KEY}"})
    assert streamed.status_code == 200 and streamed.content == b"secret data"


async def test_anthropic_clients_x_api_key_header_is_taken_as_the_key(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/models", headers={"x-api-key": KEY})).status_code == 200
    wrong = await client.get("/v1/models", headers={"x-api-key": "sk-wrong"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    both = {"x-api-key": "sk-wrong", "Authorization": f"Bearer {KEY}"}  # either one that holds the key opens
    assert (await client.get("/v1/models", headers=both)).status_code == 200


async def test_health_the_dashboard_and_cluster_messages_need_no_key(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/")).status_code == 200
    assert (await client.get("/dashboard/app.js")).status_code == 200  # it must load to ask for the key
    assert (await client.post("/dashboard/app.js")).status_code == 401
    assert (await client.post("/cluster/message")).status_code == 200  # the cluster secret guards it instead
    assert (await client.post("/health")).status_code == 401  # only the reads are public


def test_work_outside_a_request_sends_the_key_it_is_given() -> None:
    assert forward_headers() == {}
    with sending_api_key(KEY):
        assert forward_headers() == {"Authorization": f"Bearer {KEY}"}
    assert forward_headers() == {}
