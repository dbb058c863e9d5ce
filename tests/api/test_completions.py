"""/v1/completions: a real node serving Gemma 3 270M base (a Q4_K_M file with no chat template)
continues raw text, whole or streamed, exactly as the engine's own greedy generation does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nodes import RunningNode, serving_node, sse_events

from exo.engine.generate import GenerationParams, generate_text
from exo.engine.loading import load

pytestmark = pytest.mark.slow

MODEL = "gemma3-270m"
PROMPT = "The capital of France is"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def gemma_node(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, gemma_path: Path) -> Iterator[RunningNode]:
    with serving_node(tmp_path_factory.mktemp("gemma"), models_dir, "--model", MODEL, timeout=180) as node:
        yield node


@pytest.fixture(scope="module")
def expected(gemma_path: Path) -> tuple[str, int]:
    """The engine's greedy continuation of PROMPT, and the prompt's length in tokens."""
    gemma = load(gemma_path)
    prompt = gemma.tokenizer.encode(PROMPT)
    deltas = generate_text(prompt, gemma.model, gemma.tokenizer, GenerationParams(max_tokens=MAX_TOKENS),
                           gemma.model.make_cache())
    return "".join(d.text for d in deltas), len(prompt)


def complete(node: RunningNode, **fields: Any) -> httpx.Response:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, **fields}
    return httpx.post(f"{node.url}/v1/completions", json=body, timeout=120)


def test_a_base_model_continues_the_prompt_as_the_engine_does(gemma_node: RunningNode,
                                                              expected: tuple[str, int]) -> None:
    text, prompt_tokens = expected
    response = complete(gemma_node)
    assert response.status_code == 200, response.text
    completion = response.json()
    assert completion["object"] == "text_completion" and completion["id"].startswith("cmpl-")
    [choice] = completion["choices"]
    assert (choice["index"], choice["text"], choice["finish_reason"]) == (0, text, "length")
    usage = completion["usage"]
    cached = usage.pop("prompt_tokens_details")["cached_tokens"]  # held from an earlier request, if any
    assert usage == {"prompt_tokens": prompt_tokens, "completion_tokens": MAX_TOKENS,
                     "total_tokens": prompt_tokens + MAX_TOKENS}
    assert 0 <= cached < prompt_tokens
    assert complete(gemma_node, prompt=[PROMPT]).json()["choices"][0]["text"] == text  # a list of one prompt


def test_a_streamed_completion_is_the_same_text_in_chunks(gemma_node: RunningNode, expected: tuple[str, int]) -> None:
    text, prompt_tokens = expected
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{gemma_node.url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        events = list(sse_events(response))
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if isinstance(e, dict)]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == text
    assert [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == prompt_tokens


@pytest.mark.parametrize(("fields", "param"), [
    ({"echo": True}, "echo"), ({"prompt": ["one", "two"]}, "prompt"), ({"prompt": None}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 40_000}, "max_tokens"), ({"best_of": 3}, "best_of"),
])
def test_a_bad_request_is_a_400_naming_the_field(gemma_node: RunningNode, fields: dict[str, Any], param: str) -> None:
    response = complete(gemma_node, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error
    assert httpx.get(f"{gemma_node.url}/health").json()["status"] == "ok"
