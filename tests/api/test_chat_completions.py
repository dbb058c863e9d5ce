"""/v1/chat/completions over the real default model: answers, usage, stop strings, streaming, concurrency.

Greedy decoding makes answers reproducible, so streamed, concurrent and reworded requests are checked
against the same request's answer run alone. Prompts carry a short system message (the template's
default one is long) and few max_tokens: here each prompt or answer token costs tens of milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import pytest
import pytest_asyncio
from nodes import RunningNode

from exo.engine.loading import LoadedModel
from exo.models.cards import DEFAULT_MODEL

pytestmark = pytest.mark.asyncio(loop_scope="session")

URL = "/v1/chat/completions"
Messages = list[dict[str, Any]]

FRANCE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
SEA = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a poem about the sea."}]
PIRATE = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Say hello."}]
# name: (messages, max_tokens). France's answer ends well within its limit; the other two run into theirs.
PROMPTS: dict[str, tuple[Messages, int]] = {"france": (FRANCE, 12), "sea": (SEA, 6), "pirate": (PIRATE, 6)}


def greedy(name: str, **fields: Any) -> dict[str, Any]:
    messages, max_tokens = PROMPTS[name]
    return {"model": DEFAULT_MODEL, "messages": messages, "temperature": 0, "max_tokens": max_tokens, **fields}


def counts(usage: dict[str, Any]) -> dict[str, Any]:
    """Usage but for how much of the prompt the prefix cache held, which a request run again changes."""
    return {k: v for k, v in usage.items() if k != "prompt_tokens_details"}


def content(completion: dict[str, Any]) -> str:
    text: str = completion["choices"][0]["message"]["content"]
    return text


def sse_chunks(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON chunks of a server-sent event stream, checking it is framed right and ends with [DONE]."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    *events, tail = response.text.split("\n\n")
    assert tail == "" and all(event.startswith("data: ") for event in events)
    *data, done = [event.removeprefix("data: ") for event in events]
    assert done == "[DONE]"
    chunks = [json.loads(d) for d in data]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    return chunks


def streamed_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def answer(client: httpx.AsyncClient, request: dict[str, Any]) -> str:
    response = await client.post(URL, json=request)
    if request.get("stream"):
        return streamed_text(sse_chunks(response))
    assert response.status_code == 200, response.text
    return content(response.json())


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def alone(node: RunningNode) -> dict[str, dict[str, Any]]:
    """Each prompt's greedy completion, requested on its own while the node is otherwise idle."""
    async with httpx.AsyncClient(base_url=node.url, timeout=120) as client:
        completions = {}
        for name in PROMPTS:
            response = await client.post(URL, json=greedy(name))
            assert response.status_code == 200, response.text
            completions[name] = response.json()
        return completions


async def test_greedy_answer_to_the_capital_of_france_is_paris(alone: dict[str, dict[str, Any]]) -> None:
    completion = alone["france"]
    assert (completion["object"], completion["model"]) == ("chat.completion", DEFAULT_MODEL)
    assert completion["id"].startswith("chatcmpl-")
    [choice] = completion["choices"]
    assert (choice["index"], choice["message"]["role"]) == (0, "assistant")
    assert "Paris" in choice["message"]["content"]


async def test_usage_counts_the_rendered_prompt_and_the_answer(smollm: LoadedModel,
                                                               alone: dict[str, dict[str, Any]]) -> None:
    tokenizer = smollm.tokenizer
    for name, (messages, _) in PROMPTS.items():
        usage = alone[name]["usage"]
        assert usage["prompt_tokens"] == len(tokenizer.encode(tokenizer.apply_chat_template(messages)))
        assert usage["completion_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize(("name", "finish_reason"), [("france", "stop"), ("sea", "length"), ("pirate", "length")])
async def test_finish_reason_is_length_at_max_tokens_and_stop_otherwise(alone: dict[str, dict[str, Any]], name: str,
                                                                         finish_reason: str) -> None:
    completion, max_tokens = alone[name], PROMPTS[name][1]
    assert completion["choices"][0]["finish_reason"] == finish_reason
    used = completion["usage"]["completion_tokens"]
    assert used == max_tokens if finish_reason == "length" else used < max_tokens


async def test_stop_string_ends_the_answer_before_it(client: httpx.AsyncClient,
                                                     alone: dict[str, dict[str, Any]]) -> None:
    full = content(alone["france"])
    response = await client.post(URL, json=greedy("france", stop=["France", "never said"]))
    [choice] = response.json()["choices"]
    assert choice["message"]["content"] == full[:full.index("France")]
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize(("name", "include_usage"), [("france", False), ("sea", False), ("pirate", True)])
async def test_streamed_answer_equals_the_complete_one(client: httpx.AsyncClient, alone: dict[str, dict[str, Any]],
                                                       name: str, include_usage: bool) -> None:
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = sse_chunks(await client.post(URL, json=greedy(name, stream=True, **options)))
    expected = alone[name]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert streamed_text(chunks) == content(expected)
    if include_usage:
        *chunks, usage_only = chunks
        assert (usage_only["choices"], counts(usage_only["usage"])) == ([], counts(expected["usage"]))
    *body, finish = chunks
    assert all(c["choices"] for c in chunks)
    assert finish["choices"][0]["finish_reason"] == expected["choices"][0]["finish_reason"]
    assert counts(finish["usage"]) == counts(expected["usage"])
    assert not any(c["choices"][0].get("finish_reason") or c.get("usage") for c in body)


async def test_two_concurrent_requests_get_the_answers_they_get_alone(client: httpx.AsyncClient,
                                                                       alone: dict[str, dict[str, Any]]) -> None:
    names = ["sea", "pirate"]
    answers = await asyncio.gather(*(answer(client, greedy(name)) for name in names))
    assert answers == [content(alone[name]) for name in names]


async def test_four_concurrent_requests_streamed_or_not_get_the_answers_they_get_alone(
        client: httpx.AsyncClient, alone: dict[str, dict[str, Any]]) -> None:
    names, streams = ["pirate", "france", "sea", "pirate"], [True, False, True, False]
    answers = await asyncio.gather(*(answer(client, greedy(n, stream=s)) for n, s in zip(names, streams, strict=False)))
    assert answers == [content(alone[name]) for name in names]
    assert (await client.get("/health")).json()["queue_depth"] == 0


async def test_content_as_text_parts_reads_like_a_string(client: httpx.AsyncClient,
                                                         alone: dict[str, dict[str, Any]]) -> None:
    system, _ = FRANCE
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": " of France?"}]
    request = greedy("france") | {"messages": [system, {"role": "user", "content": parts}]}
    completion = (await client.post(URL, json=request)).json()
    assert (completion["choices"], counts(completion["usage"])) == (alone["france"]["choices"],
                                                                    counts(alone["france"]["usage"]))


async def test_developer_role_reads_like_system(client: httpx.AsyncClient, alone: dict[str, dict[str, Any]]) -> None:
    system, user = PIRATE
    request = greedy("pirate") | {"messages": [{**system, "role": "developer"}, user]}
    completion = (await client.post(URL, json=request)).json()
    assert (completion["choices"], counts(completion["usage"])) == (alone["pirate"]["choices"],
                                                                    counts(alone["pirate"]["usage"]))


async def test_a_chat_sharing_a_long_system_prompt_takes_its_key_values_from_the_prefix_cache(
        client: httpx.AsyncClient) -> None:
    system = {"role": "system", "content": "Zebra crossing rules for the city of Ghent, in force today. " * 12}
    ask = [[system, {"role": "user", "content": q}] for q in ("Who has priority?", "When must cyclists stop?")]

    async def metric(name: str) -> float:
        text = (await client.get("/metrics")).text
        return float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith(f'{name}{{model="{DEFAULT_MODEL}"}}')))

    hits, saved = await metric("exo_prefix_cache_hits_total"), await metric("exo_prefix_cache_tokens_total")
    first, second, again = [(await client.post(URL, json={"model": DEFAULT_MODEL, "messages": m, "temperature": 0,
                                                            "max_tokens": 6})).json() for m in [*ask, ask[1]]]
    cached = [c["usage"]["prompt_tokens_details"]["cached_tokens"] for c in (first, second, again)]
    shared = 140  # the system message alone is more than this many tokens, and the questions differ
    assert cached[0] < 16 and cached[1] > shared and cached[2] == again["usage"]["prompt_tokens"] - 1, cached
    assert content(again) == content(second)  # the whole prompt held, or only the system part: one answer
    assert await metric("exo_prefix_cache_hits_total") == hits + 2
    assert await metric("exo_prefix_cache_tokens_total") == saved + cached[1] + cached[2]


async def test_a_request_naming_no_model_goes_to_the_one_model_served(client: httpx.AsyncClient,
                                                                        alone: dict[str, dict[str, Any]]) -> None:
    request = greedy("france")
    del request["model"]
    completion = (await client.post(URL, json=request)).json()
    assert completion["model"] == DEFAULT_MODEL and content(completion) == content(alone["france"])


async def test_penalties_steer_a_greedy_answer_away_from_repeating_itself(client: httpx.AsyncClient) -> None:
    ask = {"model": DEFAULT_MODEL, "temperature": 0, "max_tokens": 16,
           "messages": [{"role": "user", "content": "Write the word cat ten times."}]}
    plain = content((await client.post(URL, json=ask)).json())
    penalized = content((await client.post(URL, json={**ask, "frequency_penalty": 2.0})).json())
    def cats(text: str) -> int:  # the word itself; a penalized model may make up longer ones
        return len(re.findall(r"\bcat\b", text, flags=re.IGNORECASE))

    assert cats(plain) >= 3, plain
    assert cats(penalized) < cats(plain), (plain, penalized)
