"""A non-streamed chat that one real node forwards to another, abandoned by its client: the entry node
closes the forwarded request, and the serving node cancels its generation and counts it as 499. And
Anthropic's and Ollama's clients, talking to the node that does not hold the model, get the serving
node's answers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import ollama
import pytest
from nodes import RunningNode, node_pair, wait_for
from prometheus_client.parser import text_string_to_metric_families

from exo import local_cluster
from exo.models.cards import DEFAULT_MODEL

pytestmark = pytest.mark.slow

ABANDONED = 3
LONG = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 4000, "temperature": 0}  # minutes of generation, were it not cancelled


def requests_counted(node: RunningNode) -> dict[tuple[str, str], float]:
    """exo_requests_total of the node's model's chats by (code, forwarded)."""
    text = httpx.get(f"{node.url}/metrics", timeout=10).text
    return {(s.labels["code"], s.labels["forwarded"]): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "exo_requests_total" and s.labels["model"] == DEFAULT_MODEL
            and s.labels["endpoint"] == "/v1/chat/completions"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[list[RunningNode]]:
    root = tmp_path_factory.mktemp("forward")
    with node_pair([root / "entry", root / "server"], models_dir, "--no-preload") as nodes:
        local_cluster.place(nodes, nodes[1:], DEFAULT_MODEL, [(0, 30)], timeout=120)  # rank 0 on the server
        yield nodes


def test_a_forwarded_chat_whose_client_leaves_is_cancelled_on_the_serving_node(cluster: list[RunningNode]) -> None:
    entry, server = cluster
    before = requests_counted(server)

    def abandon() -> None:  # waits 2 s for an answer that would take minutes, then hangs up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{entry.url}/v1/chat/completions", json=LONG, timeout=httpx.Timeout(2.0, connect=5))

    clients = [threading.Thread(target=abandon) for _ in range(ABANDONED)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()

    def cancelled() -> bool:
        health = httpx.get(f"{server.url}/health", timeout=5).json()
        grew = requests_counted(server).get(("499", "true"), 0) - before.get(("499", "true"), 0)
        return grew == ABANDONED and health["queue_depth"] == 0 and not health["busy"]

    wait_for(cancelled, 30, f"the server to cancel the {ABANDONED} abandoned chats and free its queue")
    after = requests_counted(server)
    assert after.get(("200", "true"), 0) == before.get(("200", "true"), 0)  # not counted as served
    assert all(v == 0 for (code, forwarded), v in requests_counted(entry).items())  # the entry counts nothing
    served = httpx.post(f"{entry.url}/v1/chat/completions", json={**LONG, "max_tokens": 4}, timeout=120)
    assert served.status_code == 200, served.text
    assert httpx.get(f"{entry.url}/health", timeout=5).json()["in_flight"] == 0


def test_anthropics_client_is_answered_through_the_node_that_does_not_hold_the_model(
        cluster: list[RunningNode]) -> None:
    entry, server = cluster
    request = {"model": DEFAULT_MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello."}],
               "extra_body": {"temperature": 0}}
    via_entry, direct = (anthropic.Anthropic(base_url=node.url, api_key="unused", max_retries=0) for node in cluster)
    answer = direct.messages.create(**request).content[0].text
    assert answer and via_entry.messages.create(**request).content[0].text == answer
    with via_entry.messages.stream(**request) as stream:
        assert "".join(stream.text_stream) == answer
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    forwarded = [s.value for family in text_string_to_metric_families(text) for s in family.samples
                 if s.name == "exo_requests_total" and s.labels["endpoint"] == "/v1/messages"
                 and s.labels["model"] == DEFAULT_MODEL
                 and s.labels["code"] == "200" and s.labels["forwarded"] == "true"]
    assert forwarded == [2.0]  # counted once, by the node that served them


def test_ollamas_client_is_answered_through_the_node_that_does_not_hold_the_model(
        cluster: list[RunningNode]) -> None:
    entry, server = cluster
    request = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Say hello."}],
               "options": {"temperature": 0, "num_predict": 8}}
    answer = ollama.Client(host=server.url).chat(**request).message.content
    via_entry = ollama.Client(host=entry.url)
    assert answer and via_entry.chat(**request).message.content == answer
    assert "".join(p.message.content for p in via_entry.chat(**request, stream=True)) == answer


def test_requests_to_peers_are_not_logged_one_line_each(cluster: list[RunningNode]) -> None:
    # heartbeats every 0.25 s to each peer, and the forwarded chats above: httpx logs each at INFO
    for node in cluster:
        log = node.log.read_text(errors="replace")
        assert "becomes master" in log or "follows" in log  # the lines that matter are there
        assert "HTTP Request:" not in log, node.log_tail(20)
