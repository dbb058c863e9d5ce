"""End to end: a real `exo` node process, the real model, real sockets."""

from __future__ import annotations

import asyncio
import time

import anyio
import httpx
import openai
import pytest
from nodes import RunningNode, untag

from exo.models.cards import DEFAULT_MODEL

pytestmark = pytest.mark.slow
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def chat(url: str, **body: object) -> dict:
    response = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                          json={"model": DEFAULT_MODEL, "messages": FRANCE, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_capital_of_france_mentions_paris(node: RunningNode) -> None:
    answer = chat(node.url)["choices"][0]["message"]["content"]
    assert "Paris" in answer


def test_the_default_model_runs_whole_in_one_ready_runner(node: RunningNode) -> None:
    chat(node.url, max_tokens=1)
    state = node.state()
    [instance] = map(untag, state["instances"].values())
    assert instance["modelId"] == DEFAULT_MODEL
    assert [(s["start"], s["end"]) for s in instance["shards"]] == [(0, 30)]
    [runner] = state["runners"].values()
    assert (runner["rank"], runner["status"], runner["nodeId"]) == (0, "Ready", state["nodeId"])
    chats = [t for t in state["tasks"].values() if t["kind"] == "Chat"]
    assert chats and chats[-1]["status"] == "Complete"


def test_openai_client_streaming_and_not_agree(node: RunningNode) -> None:
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused")
    assert DEFAULT_MODEL in [m.id for m in client.models.list().data]
    whole = client.chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE, temperature=0, max_tokens=24)
    stream = client.chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in whole.choices[0].message.content
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_openai_client_sees_errors_as_exceptions(node: RunningNode) -> None:
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="no-such-model", messages=FRANCE)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE, max_tokens=100_000)


def test_client_disconnect_stops_the_generation(node: RunningNode) -> None:
    story = [{"role": "user", "content": "Write a very long story about a dragon."}]
    body = {"model": DEFAULT_MODEL, "messages": story, "max_tokens": 4000, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{node.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(6)]  # a few chunks arrived, then the client hangs up
    deadline = time.monotonic() + 10
    while httpx.get(f"{node.url}/health").json()["busy"]:
        assert time.monotonic() < deadline, "the generation kept running after the client left"
        time.sleep(0.1)
    assert "cancelled" in node.log.read_text()
    assert "Paris" in chat(node.url)["choices"][0]["message"]["content"]


def test_concurrent_requests_all_complete_correctly(node: RunningNode) -> None:
    prompts = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?"]
    alone = [chat(node.url, messages=[{"role": "user", "content": p}], max_tokens=16) for p in prompts]

    async def together() -> list[dict]:
        async with httpx.AsyncClient(timeout=120) as client:
            responses = await asyncio.gather(*[client.post(f"{node.url}/v1/chat/completions", json={
                "model": DEFAULT_MODEL, "messages": [{"role": "user", "content": p}], "temperature": 0,
                "max_tokens": 16}) for p in prompts])
        return [r.json() for r in responses]

    for a, b in zip(alone, anyio.run(together), strict=True):
        assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]


def test_dashboard_is_served(node: RunningNode) -> None:
    page = httpx.get(f"{node.url}/")
    assert page.status_code == 200
    assert "/v1/chat/completions" in page.text


def test_chats_batched_together_get_their_answers_and_one_leaving_stops_only_itself(node: RunningNode) -> None:
    """Requests decoded in one batch: each gets the text it gets alone (greedy or seeded), a client that
    hangs up mid-stream leaves the batch without disturbing the others, and /state shows the batch."""
    asks = [({"messages": [{"role": "user", "content": "Name three rivers in Europe."}], "max_tokens": 40}),
            ({"messages": [{"role": "user", "content": "Write a haiku about rain."}], "max_tokens": 30,
              "temperature": 0.9, "seed": 7}),
            ({"messages": FRANCE, "max_tokens": 24, "presence_penalty": 0.5})]
    alone = [chat(node.url, **ask)["choices"][0]["message"]["content"] for ask in asks]
    story = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Write a very long story."}],
             "max_tokens": 3000, "stream": True, "temperature": 0}

    async def together() -> tuple[list[str], int]:
        async with httpx.AsyncClient(base_url=node.url, timeout=120) as client:
            widest = 0

            async def leaver() -> None:
                async with client.stream("POST", "/v1/chat/completions", json=story) as response:
                    lines = response.aiter_lines()
                    for _ in range(12):
                        await anext(lines)  # then it hangs up, the others still decoding

            async def answer(ask: dict) -> str:
                response = await client.post("/v1/chat/completions",
                                             json={"model": DEFAULT_MODEL, "temperature": 0, **ask})
                return response.json()["choices"][0]["message"]["content"]

            async def watch() -> None:
                nonlocal widest
                for _ in range(200):
                    runners = (await client.get("/state")).json()["runners"].values()
                    widest = max(widest, *(r.get("batch", 0) for r in runners))
                    await asyncio.sleep(0.05)

            watching = asyncio.create_task(watch())
            *answers, _ = await asyncio.gather(*(answer(ask) for ask in asks), leaver())
            watching.cancel()
            return answers, widest

    answers, widest = anyio.run(together)
    assert answers == alone
    assert widest >= 2
    deadline = time.monotonic() + 10
    while httpx.get(f"{node.url}/health").json()["busy"]:
        assert time.monotonic() < deadline, "the story kept going after its client left"
        time.sleep(0.1)
    [runner] = node.state()["runners"].values()
    assert runner["batch"] == 0 and runner["status"] == "Ready"
