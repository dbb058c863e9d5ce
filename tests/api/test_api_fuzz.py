"""Fuzzing every endpoint of the HTTP API, driven by the app's own OpenAPI schema (schemathesis), and by
hand-written strategies for what a schema does not say: malformed JSON, wrong content types, huge
numbers, unicode (lone surrogates included), null bytes, deep nesting, odd paths and queries, and
near-valid chats for the real model.

Every answer must be a 2xx, or a 4xx in OpenAI's error shape; never a 5xx (see `assert_answered` for
the one 503 that is not a failure), and the serving node must serve as before afterwards.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.errors import Unsatisfiable
from nodes import RunningNode, answers, idle_health, start_node, stop_node, untag, wait_for
from pydantic import ValidationError
from schemathesis import GenerationMode
from schemathesis.schemas import APIOperation, BaseSchema

from exo.api.instances import CreateInstance
from exo.api.limits import MAX_ID_CHARS
from exo.api.openai.protocol import ChatCompletionRequest
from exo.api.runners import RunnerTask
from exo.models.cards import DEFAULT_MODEL
from exo.shared.runners import SERVING, TaskKind, runner_id
from exo.shared.types import InstanceId

# Hypothesis caches what it learns (unicode tables, constants of the code under test) in ./.hypothesis as
# soon as a strategy is built, database or not: in a temporary directory instead, removed at exit.
if "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = tempfile.mkdtemp(prefix="exo-hypothesis-")
    atexit.register(shutil.rmtree, os.environ["HYPOTHESIS_STORAGE_DIRECTORY"], ignore_errors=True)
set_hypothesis_home_dir(os.environ["HYPOTHESIS_STORAGE_DIRECTORY"])

MAX_TOKENS = 4  # what a fuzzed chat may generate, so the fuzz takes seconds and not the model's context
CHAT = ("POST", "/v1/chat/completions")

# The session's node serves the real model to every test after these, so it is fuzzed only where
# nothing can break that: reads, chats, commands for ids that do not exist, and its runner given any
# task but Shutdown (the runner refuses the others that do not fit, and serves on). Every other operation
# (placements, which would load more copies of the model; maintenance mode; whatever is added later) is
# fuzzed on a spare node with no model loaded and 1 MB to offer, where every placement is refused (409).
ON_SERVING_NODE = {("GET", "/v1/models"), CHAT, ("GET", "/node_id"), ("GET", "/state"), ("GET", "/health"),
                   ("GET", "/instance/previews"), ("GET", "/instance/{instance_id}"),
                   ("DELETE", "/instance/{instance_id}"), ("POST", "/runners/{runner_id}/tasks")}
EXAMPLES = {CHAT: 50}  # per operation and mode; the rest are cheap
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))


# -- nodes and what to expect of them ---------------------------------------------------------------

class Target:
    """A node under fuzz: its URL and id, one HTTP session, whether a 503 there can be legitimate, and
    where its log stood before the fuzz."""

    def __init__(self, node: RunningNode, *, may_be_unavailable: bool) -> None:
        self.url, self.node_id, self.may_be_unavailable = node.url, node.state()["nodeId"], may_be_unavailable
        self.log, self.log_start = node.log, node.log.stat().st_size
        self.http = requests.Session()

    def tracebacks(self) -> list[str]:
        """What the node (or a runner, whose stderr goes to the same log) logged with a traceback since
        the fuzz began: a handled error is logged without one, so each is an exception nobody expected."""
        lines = self.log.read_bytes()[self.log_start:].decode(errors="replace").splitlines()
        return [lines[i - 1] if i else line for i, line in enumerate(lines) if line.startswith("Traceback")]

    def send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        response = self.http.request(method, self.url + path, timeout=60, **kwargs)
        assert_answered(response, may_be_unavailable=self.may_be_unavailable)
        return response


def assert_answered(response: requests.Response, *, may_be_unavailable: bool = False) -> None:
    """2xx, or 4xx in OpenAI's error shape. A 503 is accepted only on the spare node, and only as exo's
    deliberate refusal (error type service_unavailable, with Retry-After): a fuzzed POST /control/maintenance
    may put it in maintenance, where it rightly turns work away. A crash is a 500 in plain text."""
    request = response.request
    where = f"{request.method} {request.url} {request.body!r:.300} -> {response.status_code}: {response.text[:400]}"
    status = response.status_code
    if status == 503 and may_be_unavailable:  # as each route's API names it: OpenAI's, Anthropic's, Ollama's
        assert error_of(response)["type"] in ("service_unavailable", "overloaded_error", "ollama"), where
        assert "retry-after" in response.headers, where
        return
    assert status < 500, where
    if status >= 400:
        error_of(response, where)
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]", where
        assert not any(event.startswith('data: {"error"') for event in events), where  # a failure after the 200


def error_of(response: requests.Response, where: str = "") -> dict[str, Any]:
    """The error body: OpenAI's shape (Anthropic's on /v1/messages has the same `error` object), or on
    Ollama's routes (/api/...) Ollama's, a message string, returned here as {"message", "type"}."""
    assert response.headers.get("content-type", "").startswith("application/json"), where
    error = response.json().get("error")
    if urlsplit(response.request.url or "").path.startswith("/api/"):
        assert isinstance(error, str) and error, where
        return {"message": error, "type": "ollama"}
    assert isinstance(error, dict), where
    assert isinstance(error.get("message"), str) and error["message"], where
    assert isinstance(error.get("type"), str) and error["type"], where
    return error


@pytest.fixture(scope="module")
def serving(node: RunningNode, served: Served) -> Iterator[Target]:
    target = Target(node, may_be_unavailable=False)
    yield target
    target.http.close()


@pytest.fixture(scope="module")
def spare(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    node = start_node(tmp_path_factory.mktemp("spare"), models_dir, "--no-discovery", "--no-preload",
                      "--max-memory", "1MB")
    try:
        wait_for(lambda: answers(node, "/state") and node.state()["isMaster"], 60, "the spare node to be master")
        target = Target(node, may_be_unavailable=True)
        yield target
        target.http.close()
        assert not target.tracebacks(), node.log_tail(80)
    finally:
        assert stop_node(node) == 0, node.log_tail()


@pytest.fixture(scope="module")
def schema(node: RunningNode) -> BaseSchema:
    return schemathesis.openapi.from_url(f"{node.url}/openapi.json")


@dataclass(frozen=True)
class Served:
    """What the serving node runs before the fuzz, and must run after it: its instances and runners, and
    the default model's instance and rank-0 runner, which the fuzz may address (but not delete or stop)."""

    instances: frozenset[str]
    runners: frozenset[str]
    instance_id: str
    runner_id: str


@pytest.fixture(scope="module")
def served(node: RunningNode) -> Served:
    state = node.state()
    [instance_id] = [i for i, instance in state["instances"].items() if untag(instance)["modelId"] == DEFAULT_MODEL]
    return Served(frozenset(state["instances"]), frozenset(state["runners"]), instance_id,
                  runner_id(InstanceId(instance_id), 0))


def operations(schema: BaseSchema) -> dict[tuple[str, str], APIOperation]:
    ops = (result.ok() for result in schema.get_all_operations())
    return {(op.method.upper(), op.path): op for op in ops}


# -- schema-driven fuzz ---------------------------------------------------------------------------

def fuzz(op: APIOperation, mode: GenerationMode, target: Target, cases: st.SearchStrategy[Any] | None = None,
         adjust: Callable[[Any, st.DataObject], None] = lambda case, data: None) -> None:
    """Send `op`'s generated requests (valid ones, or ones the schema forbids) to `target`; each must be
    answered properly. `adjust` changes a case before it is sent (the real model's id, a token cap)."""
    strategy = cases if cases is not None else op.as_strategy(generation_mode=mode)

    @settings(FUZZ, max_examples=EXAMPLES.get((op.method.upper(), op.path), 40))
    @given(case=strategy, data=st.data())
    def run(case: Any, data: st.DataObject) -> None:
        adjust(case, data)
        kwargs = case.as_transport_kwargs(base_url=target.url)
        kwargs["headers"].pop("X-Schemathesis-TestCaseId", None)
        target.send(kwargs.pop("method"), kwargs.pop("url")[len(target.url):], **kwargs)

    try:
        run()
    except Unsatisfiable:
        assert mode == GenerationMode.NEGATIVE  # an operation whose every input is valid (no body, a str path)


def bounded_chat(body: Any, real_model: bool) -> Any:
    """`body` with the real model's id when asked, and, if that makes it a valid request, a limit of at most
    MAX_TOKENS tokens (any other limit of a valid request would generate up to the model's context)."""
    if not isinstance(body, dict):
        return body
    body = {**body, "model": DEFAULT_MODEL} if real_model else dict(body)
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError:
        return body
    if request.token_limit is None or request.token_limit > MAX_TOKENS:
        body["max_completion_tokens"] = 1 + (request.token_limit or 0) % MAX_TOKENS
    return body


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_chat_completions_answer_fuzzed_bodies_without_a_5xx(schema: BaseSchema, serving: Target,
                                                             mode: GenerationMode) -> None:
    def adjust(case: Any, data: st.DataObject) -> None:
        case.body = bounded_chat(case.body, real_model=data.draw(st.booleans(), label="real model"))

    fuzz(operations(schema)[CHAT], mode, serving, adjust=adjust)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_the_serving_nodes_other_endpoints_answer_fuzzed_requests_without_a_5xx(
        schema: BaseSchema, serving: Target, served: Served, mode: GenerationMode) -> None:
    ops = operations(schema)
    assert ON_SERVING_NODE <= set(ops), ON_SERVING_NODE - set(ops)  # a renamed endpoint is not silently skipped
    real_instance, real_runner = served.instance_id, served.runner_id
    for key in sorted(ON_SERVING_NODE - {CHAT}):
        op, cases = ops[key], None
        if key == ("GET", "/instance/{instance_id}"):  # now and then the real instance: a 200
            cases = st.one_of(op.as_strategy(generation_mode=mode),
                              op.as_strategy(generation_mode=mode, path_parameters={"instance_id": real_instance}))
        elif key == ("GET", "/instance/previews"):  # now and then the real model: its placements
            cases = st.one_of(op.as_strategy(generation_mode=mode),
                              op.as_strategy(generation_mode=mode, query={"model_id": DEFAULT_MODEL}))
        elif key == ("POST", "/runners/{runner_id}/tasks"):  # now and then the real runner, with any task
            cases = st.one_of(op.as_strategy(generation_mode=mode),
                              op.as_strategy(generation_mode=mode, path_parameters={"runner_id": real_runner}))
        fuzz(op, mode, serving, cases, adjust=lambda case, data: assume(not _destructive(case, served)))
    # a fuzzed Warmup keeps the runner busy a moment: it must be serving again for the tests after this one
    wait_for(lambda: serving.http.get(serving.url + "/health", timeout=5).json()["runners"][real_runner] in SERVING,
             60, "the runner to be Ready again")


def _destructive(case: Any, served: Served) -> bool:
    """Deleting the serving node's instances, or stopping its runners: the rest of the session needs them."""
    if case.method.upper() == "DELETE":
        return case.path_parameters.get("instance_id") in served.instances
    if case.path_parameters.get("runner_id") not in served.runners:
        return False
    try:
        return RunnerTask.model_validate(case.body).kind == TaskKind.SHUTDOWN
    except ValidationError:
        return False


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_every_other_endpoint_answers_fuzzed_requests_on_a_spare_node_without_a_5xx(
        schema: BaseSchema, spare: Target, mode: GenerationMode) -> None:
    others = {key: op for key, op in operations(schema).items() if key not in ON_SERVING_NODE}
    assert ("POST", "/place_instance") in others and ("POST", "/instance") in others

    def real_model(case: Any, data: st.DataObject) -> None:  # now and then a placement it has no memory for: 409
        if isinstance(case.body, dict) and "modelId" in case.body and data.draw(st.booleans(), label="real model"):
            case.body = {**case.body, "modelId": DEFAULT_MODEL}  # the schema spells the body as /state does

    for key, op in sorted(others.items()):
        fuzz(op, mode, spare, adjust=real_model if key == ("POST", "/place_instance") else lambda case, data: None)


# -- what a schema does not say -------------------------------------------------------------------

SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
TEXT = st.one_of(  # short: a chat's prompt is processed token by token on this CPU (long ones: test_chat_errors)
    st.text(max_size=30),
    st.text(st.characters(codec="utf-8") | SURROGATES | st.sampled_from("\x00\u202e\ufeff\U0001f600"), max_size=30),
    st.sampled_from(["", "\x00", "\ud800", "\udfff\ud800", "<|im_end|>", "<|im_start|>system", "{{ 7*7 }}",
                     "{% for x in range(10**9) %}{% endfor %}", "\n" * 50, "\U0001f600" * 100]),
)
HUGE_INTS = st.sampled_from([-1, 0, 2**31, 2**53 + 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30, 10**300])
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | HUGE_INTS | st.floats() | TEXT,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                           max_leaves=15)


def as_json(value: Any) -> bytes:
    """JSON as a client might send it: NaN and Infinity literals allowed, lone surrogates as \\u escapes."""
    return json.dumps(value, allow_nan=True, ensure_ascii=True).encode()


@st.composite
def chats(draw: st.DrawFn) -> dict[str, Any]:
    """Requests for the real model, mostly valid, with extremes in every field and a few wrong ones."""
    role = st.sampled_from(["system", "developer", "user", "assistant"] * 4 + ["tool", "", "USER"])
    text = st.text(max_size=30) | st.text(st.characters(codec="utf-8"), max_size=30) | TEXT
    content = text | st.none() | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=3)
    message = st.fixed_dictionaries({"role": role, "content": content})
    body: dict[str, Any] = {"model": DEFAULT_MODEL, "messages": draw(st.lists(message, min_size=1, max_size=3)),
                            "max_tokens": draw(st.integers(1, MAX_TOKENS))}
    optional: dict[str, st.SearchStrategy[Any]] = {
        "temperature": st.floats(0, 2) | st.sampled_from([float("nan"), float("inf"), -0.0, 2.0000001]),
        "top_p": st.floats(0, 1, exclude_min=True) | st.sampled_from([0, float("nan"), 1e-300]),
        "seed": st.integers(0, 2**64 - 1) | HUGE_INTS,
        "stop": TEXT | st.lists(TEXT, max_size=5) | st.none(),
        "stream": st.booleans(),
        "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}),
        "n": st.sampled_from([1, 2]),
        "user": TEXT, "logprobs": st.booleans(), "tools": JSON_VALUES,  # fields exo ignores
    }
    for field, strategy in optional.items():
        if draw(st.integers(0, 3)) == 0:
            body[field] = draw(strategy)
    return body


@settings(FUZZ, max_examples=50)
@given(body=chats())
def test_near_valid_chats_for_the_real_model_are_served_or_refused_with_a_400(serving: Target,
                                                                              body: dict[str, Any]) -> None:
    try:
        ChatCompletionRequest.model_validate(json.loads(as_json(body)))  # as the API parses it
        valid = True
    except ValidationError:
        valid = False
    response = serving.send("POST", "/v1/chat/completions", data=as_json(body),
                            headers={"Content-Type": "application/json"})
    # A request the API's own model takes is served (the chat template takes any roles and text) unless
    # its prompt outgrows the context; anything else is refused, naming what is wrong.
    if valid and response.status_code == 400:
        assert error_of(response)["code"] == "ContextTooLong", (body, response.text[:300])
    else:
        assert response.status_code == (200 if valid else 400), (body, response.text[:300])


CONTENT_TYPES = st.sampled_from([None, "application/json", "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", "application/json; charset=utf-16",
                                 "application/problem+json", "application/msgpack", "application/json; x=\"\""])
RAW_BODIES = st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(as_json),
    JSON_VALUES.map(as_json).flatmap(lambda b: st.integers(0, max(len(b) - 1, 0)).map(lambda cut: b[:cut])),
    st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 100_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.integers(1, 10_000).map(lambda n: b'{"model": ' + b"9" * n + b"}"),
    st.sampled_from([b"NaN", b"-Infinity", b'{"model": NaN}', b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b"{}" * 3,
                     b'{"model": "\\ud800", "model_id": "\\udfff", "kind": "\\u0000", "mode": "drain\\u0000"}']),
)


@settings(FUZZ, max_examples=120)
@given(data=st.data(), body=RAW_BODIES, content_type=CONTENT_TYPES)
def test_malformed_bodies_of_any_content_type_are_4xx_in_the_error_shape(
        schema: BaseSchema, serving: Target, spare: Target, data: st.DataObject, body: bytes,
        content_type: str | None) -> None:
    posts = sorted(path for method, path in operations(schema) if method == "POST")
    path = data.draw(st.sampled_from(posts), label="path").replace("{runner_id}", "no-such-runner")
    target = serving if ("POST", path) in ON_SERVING_NODE or path.startswith("/runners/") else spare
    headers = {"Content-Type": content_type} if content_type else {}
    target.send("POST", path, data=body, headers=headers)


@st.composite
def explicit_instances(draw: st.DrawFn, node_id: str) -> dict[str, Any]:
    """POST /instance bodies that name a real node and cover their layers, with extreme layer counts and
    any model id (never the real model's: its runners would load it)."""
    n = draw(st.integers(1, 48) | HUGE_INTS)
    cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=2)))) if n > 1 else []
    bounds = [0, *cuts, max(n, 1)]
    shards = [{"node_id": node_id, "rank": rank, "start": start, "end": end}
              for rank, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False))]
    return {"model_id": draw(TEXT.filter(lambda t: t != DEFAULT_MODEL)), "n_layers": n, "shards": shards}


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_explicit_placements_are_taken_or_refused_with_a_400(spare: Target, data: st.DataObject) -> None:
    body = data.draw(explicit_instances(spare.node_id))
    try:
        CreateInstance.model_validate(json.loads(as_json(body)))
        valid = True
    except ValidationError:
        valid = False
    response = spare.send("POST", "/instance", data=as_json(body), headers={"Content-Type": "application/json"})
    assert response.status_code == (200 if valid else 400), (body, response.text[:300])


URL_TEXT = TEXT | st.sampled_from(["..", ".", "/", "%", "%00", "%ff", "?x=1", "#", " ", "a" * 5000, "\r\n"])
SHORT_TEXT = st.text(max_size=20) | st.sampled_from(["", "\x00", "\ud800", "%", "&", "=", "[]", "a[b]"])  # a request
# line over h11's 16 KiB is refused by the HTTP server itself, before the app


def in_url(text: str) -> str:
    """`text` percent-encoded for a path or query; lone surrogates go as the bytes a broken client sends."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


@settings(FUZZ, max_examples=80)
@given(data=st.data(), text=URL_TEXT, junk=st.dictionaries(SHORT_TEXT, SHORT_TEXT, max_size=3))
def test_fuzzed_paths_and_queries_are_answered_without_a_5xx(serving: Target, served: Served,
                                                             data: st.DataObject, text: str,
                                                             junk: dict[str, str]) -> None:
    query = "&".join(f"{in_url(k)}={in_url(v)}" for k, v in junk.items())
    method, path, body = data.draw(st.sampled_from([
        ("GET", f"/instance/{in_url(text)}", None),
        ("DELETE", f"/instance/{in_url(text)}", None),
        ("GET", f"/instance/previews?model_id={in_url(text)}", None),
        ("POST", f"/runners/{in_url(text)}/tasks", {"kind": TaskKind.LOAD}),
        ("GET", f"/v1/models?{query}", None),
        ("GET", f"/state?{query}", None),
        ("GET", f"/health?{query}", None),
    ]), label="request")
    assume(not any(name in text for name in served.instances | served.runners))
    response = serving.send(method, path, json=body)
    if method == "DELETE" and "/" not in text and text not in ("", ".", ".."):
        # only ids that do not exist (or cannot, being too long): nothing deleted
        expected = (400, 404) if len(text) > MAX_ID_CHARS else (404,)
        assert response.status_code in expected, response.text[:300]


def test_every_path_answers_every_method_without_a_body_in_the_error_shape(schema: BaseSchema, serving: Target,
                                                                          spare: Target) -> None:
    defined = set(operations(schema))
    for path in sorted({path for _, path in defined}):
        concrete = path.replace("{instance_id}", "no-such-instance").replace("{runner_id}", "no-such-runner")
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"):
            # what the serving node may be sent, or no operation at all (a 405); the rest to the spare
            safe = (method, path) in ON_SERVING_NODE or (method, path) not in defined
            target = serving if safe else spare
            response = target.http.request(method, target.url + concrete, timeout=30)
            if method == "HEAD":  # no body to hold the error; HEAD /health is a 503 where GET's is
                unavailable = response.status_code == 503 and target.may_be_unavailable
                assert response.status_code < 500 or unavailable, (method, path, response.status_code)
            else:
                assert_answered(response, may_be_unavailable=target.may_be_unavailable)


# -- regressions the fuzz found -------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value"), [
    ("seed", -1), ("seed", 2**64), ("seed", 2**70),
    ("messages", [{"role": "user", "content": "hi \ud800"}]),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]),
    ("stop", ["\ud800"]), ("stop", "a\udc00"),
])
def test_seeds_the_sampler_cannot_take_and_unpaired_surrogates_are_400s_naming_the_field(
        serving: Target, field: str, value: Any) -> None:
    # Each was a 500: the runner's sampler refused the seed, or the tokenizer or the runner pipe the text.
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, field: value}
    response = serving.send("POST", "/v1/chat/completions", data=as_json(body),
                            headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and error_of(response)["param"].split(".")[0] == field, response.text


def test_the_largest_seed_is_served(serving: Target) -> None:
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
            "temperature": 1.0, "seed": 2**64 - 1}
    assert serving.send("POST", "/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize(("n_layers", "model_id"), [(2**70, "x"), (2**63, "x"), (1, "\ud800")])
def test_an_instance_the_cluster_could_not_send_to_its_peers_is_refused_and_the_node_lives(
        spare: Target, n_layers: int, model_id: str) -> None:
    # Each stopped the node: the master took the instance, then could not encode the event for its peers.
    shard = {"node_id": spare.node_id, "rank": 0, "start": 0, "end": n_layers}
    body = {"model_id": model_id, "n_layers": n_layers, "shards": [shard]}
    response = spare.send("POST", "/instance", data=as_json(body), headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    time.sleep(0.5)  # a heartbeat or two
    assert spare.http.get(spare.url + "/state", timeout=10).status_code == 200


# -- and after all that ---------------------------------------------------------------------------

@pytest.mark.asyncio(loop_scope="session")
async def test_the_serving_node_is_intact_after_the_fuzz(client: httpx.AsyncClient, serving: Target,
                                                        served: Served) -> None:
    assert not serving.tracebacks()
    health = await idle_health(client)
    assert health["status"] == "ok" and health["runners_ready"] == len(served.runners) == 1, health
    state = (await client.get("/state")).json()
    assert set(state["instances"]) == served.instances  # none deleted, none placed
    assert state["runners"][served.runner_id]["status"] in SERVING
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
