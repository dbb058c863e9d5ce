"""GET /v1/models and GET /health."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from nodes import idle_health

from exo import __version__
from exo.models.cards import CARDS, DEFAULT_MODEL

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_models_lists_the_default_model(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models")
    assert response.status_code == 200
    models = response.json()
    assert models["object"] == "list"
    [card] = [m for m in models["data"] if m["id"] == DEFAULT_MODEL]
    assert card["object"] == "model" and card["owned_by"] == "exo"
    assert card["context_length"] == CARDS[DEFAULT_MODEL].context_length
    assert card["downloaded"] is True  # the session's fixtures fetched it
    assert card["license"] == "Apache-2.0"
    assert {m["id"] for m in models["data"]} >= set(CARDS)
    assert "local_path" not in card


async def test_health_is_ok_with_an_empty_queue_when_idle(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).status_code == 200
    health = await idle_health(client)
    assert (health["status"], health["queue_depth"], health["busy"]) == ("ok", 0, False)
    assert health["version"] == __version__ and health["runners_ready"] == 1


async def test_health_shows_the_queue_while_generating(client: httpx.AsyncClient) -> None:
    request = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    generating = asyncio.create_task(client.post("/v1/chat/completions", json=request))
    try:
        for _ in range(600):
            health = (await client.get("/health")).json()
            if health["busy"]:
                break
            await asyncio.sleep(0.01)
        assert (health["status"], health["busy"]) == ("ok", True)
        assert health["queue_depth"] >= 1
    finally:
        assert (await generating).status_code == 200
    health = await idle_health(client)
    assert (health["queue_depth"], health["busy"]) == (0, False)
