"""Every way a chat request can be refused answers in OpenAI's error shape, naming the field at fault.

All but the last test are refused before any token is generated; each checks the node is left
idle, and the last one checks the node still answers.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from nodes import idle_health

from exo.api.openai.serving import ChatService
from exo.engine.loading import LoadedModel
from exo.master.planner import DEFAULT_CONTEXT
from exo.models.cards import CARDS, DEFAULT_MODEL
from exo.shared.errors import InvalidRequest

pytestmark = pytest.mark.asyncio(loop_scope="session")

URL = "/v1/chat/completions"
CONTEXT = min(DEFAULT_CONTEXT, CARDS[DEFAULT_MODEL].context_length)  # what the node's instance serves
HI = [{"role": "user", "content": "Hi"}]


def body(**fields: Any) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL, "messages": HI, "max_tokens": 1, **fields}


def assert_error(response: httpx.Response, status: int, error_type: str, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert list(response.json()) == ["error"]
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == (error_type, param)
    assert isinstance(error["message"], str) and error["message"]
    return error


async def assert_idle(client: httpx.AsyncClient) -> None:
    health = await idle_health(client)
    assert (health["status"], health["queue_depth"], health["busy"]) == ("ok", 0, False)


INVALID_FIELDS = [
    pytest.param(body(model=""), "model", id="empty-model"),
    pytest.param({"model": DEFAULT_MODEL}, "messages", id="missing-messages"),
    pytest.param(body(messages=[]), "messages", id="empty-messages"),
    pytest.param(body(messages="Hi"), "messages", id="messages-as-a-string"),
    pytest.param(body(messages=["Hi"]), "messages.0", id="message-as-a-string"),
    pytest.param(body(messages=[{"role": "robot", "content": "Hi"}]), "messages.0.role", id="unknown-role"),
    pytest.param(body(messages=[*HI, {"content": "Hi"}]), "messages.1.role", id="missing-role"),
    pytest.param(body(messages=[{"role": "user", "content": 5}]), "messages.0.content", id="content-as-a-number"),
    pytest.param(body(messages=[{"role": "user", "content": {"text": "Hi"}}]), "messages.0.content",
                 id="content-as-an-object"),
    pytest.param(body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
                 "messages.0.content", id="content-part-not-text"),
    pytest.param(body(temperature=3), "temperature", id="temperature-above-2"),
    pytest.param(body(temperature=-0.5), "temperature", id="temperature-negative"),
    pytest.param(body(top_p=0), "top_p", id="top_p-0"),
    pytest.param(body(top_p=1.5), "top_p", id="top_p-above-1"),
    pytest.param(body(max_tokens=0), "max_tokens", id="max_tokens-0"),
    pytest.param(body(max_tokens=-5), "max_tokens", id="max_tokens-negative"),
    pytest.param(body(max_tokens="many"), "max_tokens", id="max_tokens-a-word"),
    pytest.param(body(max_completion_tokens=0), "max_completion_tokens", id="max_completion_tokens-0"),
    pytest.param(body(n=2), "n", id="n-2-unsupported"),
    pytest.param(body(stop=["a", "b", "c", "d", "e"]), "stop", id="five-stop-strings"),
    pytest.param(body(stop={"a": 1}), "stop", id="stop-an-object"),
    pytest.param(body(stream_options={"include_usage": "maybe"}), "stream_options.include_usage",
                 id="include_usage-not-a-bool"),
]


@pytest.mark.parametrize(("request_body", "param"), INVALID_FIELDS)
async def test_invalid_field_is_a_400_that_names_it(client: httpx.AsyncClient, request_body: dict[str, Any],
                                                      param: str) -> None:
    error = assert_error(await client.post(URL, json=request_body), 400, "invalid_request_error", param)
    assert error["message"].startswith(f"{param}: ")
    await assert_idle(client)


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_unknown_model_is_a_404_that_names_model(client: httpx.AsyncClient, stream: bool) -> None:
    response = await client.post(URL, json=body(model="no-such-model", stream=stream))
    error = assert_error(response, 404, "not_found_error", "model")
    assert "no-such-model" in error["message"] and "/v1/models" in error["message"]
    await assert_idle(client)


async def test_body_that_is_not_json_is_a_400(client: httpx.AsyncClient) -> None:
    response = await client.post(URL, content=b'{"model": "smollm2', headers={"content-type": "application/json"})
    error = assert_error(response, 400, "invalid_request_error", None)
    assert error["code"] == "json_invalid"
    assert error["message"].startswith("The request body is not valid JSON")
    await assert_idle(client)


@pytest.mark.parametrize("request_body", [[body()], "hello", 42], ids=["list", "string", "number"])
async def test_body_that_is_not_a_json_object_is_a_400(client: httpx.AsyncClient, request_body: Any) -> None:
    assert_error(await client.post(URL, json=request_body), 400, "invalid_request_error", None)
    await assert_idle(client)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_beyond_the_context_is_a_400_that_says_how_much_room_is_left(
        client: httpx.AsyncClient, smollm: LoadedModel, field: str) -> None:
    tokenizer = smollm.tokenizer
    room = CONTEXT - len(tokenizer.encode(tokenizer.apply_chat_template(HI)))
    for limit in (room + 1, CONTEXT):
        response = await client.post(URL, json={"model": DEFAULT_MODEL, "messages": HI, field: limit})
        error = assert_error(response, 400, "invalid_request_error", field)
        assert f"{field} is {limit}" in error["message"] and f"only {room} tokens" in error["message"]
    await assert_idle(client)


async def test_prompt_longer_than_the_context_is_a_400_that_names_messages(client: httpx.AsyncClient) -> None:
    response = await client.post(URL, json=body(messages=[{"role": "user", "content": "hello " * 9000}]))
    error = assert_error(response, 400, "invalid_request_error", "messages")
    assert str(CONTEXT) in error["message"]
    await assert_idle(client)


@pytest.mark.parametrize(("method", "path", "status"), [("GET", URL, 405), ("POST", "/v1/nothing", 404)])
async def test_wrong_route_or_method_answers_in_the_same_shape(client: httpx.AsyncClient, method: str, path: str,
                                                               status: int) -> None:
    assert_error(await client.request(method, path), status, "invalid_request_error", None)


async def test_node_still_answers_after_the_errors(client: httpx.AsyncClient) -> None:
    response = await client.post(URL, json=body(temperature=0))
    assert response.status_code == 200, response.text
    completion = response.json()
    assert completion["choices"][0]["finish_reason"] == "length"
    assert completion["usage"]["completion_tokens"] == 1
    await assert_idle(client)


@pytest.mark.parametrize(("served", "says"), [([], "No model is served yet"),
                                             (["a-model", "b-model"], "Several models are served (a-model, b-model)")])
def test_a_request_naming_no_model_is_a_400_unless_exactly_one_is_served(served: list[str], says: str) -> None:
    chat = ChatService(None, None, None, None, served=lambda: served)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest) as refused:
        chat._only_model()
    assert refused.value.message.startswith(says) and refused.value.param == "model"
    assert ChatService(None, None, None, None, served=lambda: ["a-model"])._only_model() == "a-model"  # type: ignore[arg-type]
