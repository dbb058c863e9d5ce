"""POST /v1/messages driven by Anthropic's own Python client against a real node and the real model: the
same greedy answer as /v1/chat/completions gives, plain and streamed, with Anthropic's stop reasons,
usage and error shapes."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import pytest
from nodes import RunningNode

from exo.models.cards import DEFAULT_MODEL

SYSTEM = "Be brief."
QUESTION = "What is the capital of France?"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def claude(node: RunningNode) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=node.url, api_key="not-checked-by-a-node-without-one", max_retries=0)


@pytest.fixture(scope="module")
def openai_answer(node: RunningNode) -> dict[str, Any]:
    """The same request through the OpenAI-compatible route."""
    body = {"model": DEFAULT_MODEL, "temperature": 0, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]}
    answer: dict[str, Any] = httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=120).json()
    return answer


def ask(claude: anthropic.Anthropic, temperature: float = 0, **fields: Any) -> Any:
    request = {"model": DEFAULT_MODEL, "max_tokens": MAX_TOKENS, "system": SYSTEM,
               "messages": [{"role": "user", "content": QUESTION}], **fields}
    # the client has no `temperature` argument any more; the API still takes the field, and exo does
    return claude.messages.create(**request, extra_body={"temperature": temperature})


def test_a_message_gets_the_answer_the_chat_completions_route_gives(
        claude: anthropic.Anthropic, openai_answer: dict[str, Any]) -> None:
    message = ask(claude)
    expected = openai_answer["choices"][0]
    assert (message.type, message.role, message.model) == ("message", "assistant", DEFAULT_MODEL)
    assert message.id.startswith("msg_")
    [block] = message.content
    assert block.type == "text" and block.text == expected["message"]["content"] and "Paris" in block.text
    assert message.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[expected["finish_reason"]]
    assert message.stop_sequence is None
    usage = openai_answer["usage"]
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == usage["prompt_tokens"]
    assert message.usage.cache_read_input_tokens > 0  # the same prompt as before: the prefix cache holds it
    assert message.usage.output_tokens == usage["completion_tokens"]


def test_a_streamed_message_arrives_as_anthropics_events_with_the_same_text(
        claude: anthropic.Anthropic, openai_answer: dict[str, Any]) -> None:
    request = {"model": DEFAULT_MODEL, "max_tokens": MAX_TOKENS, "system": SYSTEM,
               "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]}
    with claude.messages.stream(**request, extra_body={"temperature": 0}) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) >= 2 and "".join(pieces) == openai_answer["choices"][0]["message"]["content"]
    assert final.content[0].text == "".join(pieces)
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.output_tokens == openai_answer["usage"]["completion_tokens"]


def test_a_stop_sequence_ends_the_text_before_it_and_is_named(claude: anthropic.Anthropic,
                                                              openai_answer: dict[str, Any]) -> None:
    assert "Paris" in openai_answer["choices"][0]["message"]["content"]
    message = ask(claude, stop_sequences=["Paris"])
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "Paris")
    assert "Paris" not in message.content[0].text
    assert openai_answer["choices"][0]["message"]["content"].startswith(message.content[0].text)


def test_bad_requests_are_refused_in_anthropics_error_shape(claude: anthropic.Anthropic, node: RunningNode) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        ask(claude, model="no-such-model")
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as hot:
        ask(claude, temperature=1.5)  # Anthropic's range is 0 to 1
    assert hot.value.body["error"]["type"] == "invalid_request_error"
    assert "temperature" in hot.value.body["error"]["message"]
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}]}  # no max_tokens
    answer = httpx.post(f"{node.url}/v1/messages", json=body, timeout=30)
    assert answer.status_code == 400
    assert answer.json()["type"] == "error" and "max_tokens" in answer.json()["error"]["message"]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    with pytest.raises(anthropic.BadRequestError):
        ask(claude, messages=[{"role": "user", "content": [image]}])
    assert ask(claude).content[0].text  # and the node still answers
