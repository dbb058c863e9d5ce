"""Ollama's API driven by Ollama's own Python client against a real node and the real model: chats and
generations plain and streamed (one JSON object a line), with the greedy answer /v1/chat/completions
gives, and the model listings Ollama apps read."""

from __future__ import annotations

from typing import Any

import httpx
import ollama
import pytest
from nodes import RunningNode

from exo import __version__
from exo.models.cards import CARDS, DEFAULT_MODEL

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def client(node: RunningNode) -> ollama.Client:
    return ollama.Client(host=node.url)


@pytest.fixture(scope="module")
def openai_answer(node: RunningNode) -> dict[str, Any]:
    body = {"model": DEFAULT_MODEL, "temperature": 0, "max_tokens": 12, "messages": MESSAGES}
    answer: dict[str, Any] = httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=120).json()
    return answer


def test_a_chat_plain_and_streamed_gets_the_answer_the_chat_completions_route_gives(
        client: ollama.Client, openai_answer: dict[str, Any]) -> None:
    expected = openai_answer["choices"][0]["message"]["content"]
    reply = client.chat(model=DEFAULT_MODEL, messages=MESSAGES, options=GREEDY)
    assert (reply.model, reply.done, reply.message.role, reply.message.content) == (
        DEFAULT_MODEL, True, "assistant", expected)
    assert reply.done_reason == {"stop": "stop", "length": "length"}[openai_answer["choices"][0]["finish_reason"]]
    assert reply.eval_count == openai_answer["usage"]["completion_tokens"]
    assert 0 < reply.prompt_eval_count <= openai_answer["usage"]["prompt_tokens"]  # less what the prefix cache held
    assert reply.total_duration >= reply.eval_duration > 0
    pieces = list(client.chat(model=DEFAULT_MODEL, messages=MESSAGES, options=GREEDY, stream=True))
    assert len(pieces) >= 2 and [p.done for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(p.message.content for p in pieces) == expected
    assert pieces[-1].eval_count == reply.eval_count


def test_generate_renders_the_chat_template_unless_raw(client: ollama.Client, openai_answer: dict[str, Any]) -> None:
    system, user = MESSAGES
    made = client.generate(model=DEFAULT_MODEL, prompt=user["content"], system=system["content"], options=GREEDY)
    assert made.done and made.response == openai_answer["choices"][0]["message"]["content"]
    raw = "".join(p.response for p in client.generate(model=DEFAULT_MODEL, prompt="The capital of France is",
                                                      raw=True, options=GREEDY | {"num_predict": 4}, stream=True))
    assert raw.strip() and raw != made.response  # the text continued as it is, no template around it


def test_the_listings_name_the_models(client: ollama.Client) -> None:
    listed = {m.model: m for m in client.list().models}
    assert DEFAULT_MODEL in listed
    card = CARDS[DEFAULT_MODEL]
    assert listed[DEFAULT_MODEL].size == card.bytes and listed[DEFAULT_MODEL].details.quantization_level == "Q4_1"
    assert [m.model for m in client.ps().models] == [DEFAULT_MODEL]  # the node's one instance
    shown = client.show(DEFAULT_MODEL)
    assert shown.license == card.license and shown.details.parameter_size == "135M"


def test_errors_are_ollamas_error_body(client: ollama.Client, node: RunningNode) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="no-such-model", messages=MESSAGES)
    assert missing.value.status_code == 404 and "no-such-model" in missing.value.error
    with pytest.raises(ollama.ResponseError) as hot:
        client.chat(model=DEFAULT_MODEL, messages=MESSAGES, options={"temperature": 5})
    assert hot.value.status_code == 400 and "temperature" in hot.value.error
    with pytest.raises(ollama.ResponseError) as shaped:
        client.chat(model=DEFAULT_MODEL, messages=MESSAGES, format="json")  # constrained output: not yet
    assert shaped.value.status_code == 400 and "format" in shaped.value.error
    assert httpx.get(f"{node.url}/api/version", timeout=10).json() == {"version": __version__}
