"""A node's lifecycle with real processes: stops in three phases, a watchdog, backpressure, maintenance.

Every test reads the node's log at the end: no "Queue is closed", no ClosedResourceError, and no
traceback, whatever was stopped or killed.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from nodes import (
    RunningNode,
    assert_clean_log,
    runner_pids,
    serving_node,
    sse_events,
    start_node,
    stop_node,
    wait_for,
    whole_runner_ready,
)

from exo.models.cards import DEFAULT_MODEL

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


def chat(node: RunningNode, max_tokens: int = 4, **extra: Any) -> httpx.Response:
    body = {"model": DEFAULT_MODEL, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=120)


@pytest.fixture(scope="module")
def tough_node(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[RunningNode]:
    """A node with a queue of one request and a quick watchdog, shared by the tests that keep it alive."""
    with serving_node(tmp_path_factory.mktemp("tough"), models_dir,
                      env={"EXO_QUEUE_LIMIT": "1", "EXO_WATCHDOG_TIMEOUT": "20"}) as node:
        yield node


def test_sigterm_during_a_stream_lets_it_finish_refuses_new_work_and_exits_0(
        tmp_path: Path, models_dir: Path) -> None:
    node = start_node(tmp_path / "node", models_dir, "--no-discovery", env={"EXO_DEBUG_COORDINATION": "1"})
    try:
        wait_for(lambda: whole_runner_ready(node), 120, "the node's runner to be ready")
        pids = runner_pids(node.process.pid)
        body = {"model": DEFAULT_MODEL, "messages": QUESTION, "max_tokens": 48, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{node.url}/v1/chat/completions", json=body, timeout=120) as response:
            events = sse_events(response)
            first = next(events)
            assert isinstance(first, dict) and "choices" in first
            node.process.send_signal(signal.SIGTERM)
            wait_for(lambda: httpx.get(f"{node.url}/health", timeout=5).json()["status"] == "stopping", 10,
                     "the node to start draining")
            refused = chat(node)
            assert refused.status_code == 503 and refused.headers["retry-after"]
            assert "shutting down" in refused.json()["error"]["message"]
            rest = list(events)
        finishes = [e["choices"][0].get("finish_reason") for e in rest if isinstance(e, dict) and e.get("choices")]
        assert rest[-1] == "[DONE]" and finishes[-1] == "length", rest[-3:]
        assert not [e for e in rest if isinstance(e, dict) and "error" in e]
        node.process.wait(timeout=30)
        assert node.process.returncode == 0, node.log_tail()
        wait_for(lambda: not [p for p in pids if psutil.pid_exists(p)], 5, "the runner to exit")
        log = node.log.read_text()
        for phase in ("stop phase 1", "stop phase 2", "stop phase 3"):
            assert phase in log, node.log_tail()
    finally:
        stop_node(node)
    assert_clean_log(node)


def test_sigkill_of_a_node_leaves_no_runner_behind(tmp_path: Path, models_dir: Path) -> None:
    node = start_node(tmp_path / "node", models_dir, "--no-discovery")
    try:
        wait_for(lambda: whole_runner_ready(node), 120, "the node's runner to be ready")
        pids = runner_pids(node.process.pid)
        assert len(pids) == 1
        node.process.kill()
        node.process.wait(timeout=10)
        wait_for(lambda: not [p for p in pids if psutil.pid_exists(p)], 5, "the runner to die with its node")
    finally:
        stop_node(node, signal.SIGKILL)
    assert_clean_log(node)


def test_a_killed_runner_is_restarted_by_the_watchdog_and_the_next_request_works(tough_node: RunningNode) -> None:
    [pid] = runner_pids(tough_node.process.pid)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: runner_pids(tough_node.process.pid) not in ([], [pid]) and whole_runner_ready(tough_node), 120,
             "the watchdog to start a new runner")
    [runner] = tough_node.state()["runners"].values()
    assert runner["restarts"] == 1 and runner["status"] == "Ready" and not runner["gaveUp"]
    response = chat(tough_node)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4
    assert_clean_log(tough_node)


def test_beyond_its_queue_an_instance_answers_503_with_retry_after(tough_node: RunningNode) -> None:
    answered: list[httpx.Response] = []
    first = threading.Thread(target=lambda: answered.append(chat(tough_node, max_tokens=64)))
    first.start()
    try:
        wait_for(lambda: sum(tough_node.state()["queues"].values()) == 1, 30, "the first request to be queued")
        for stream in (False, True):  # a stream is refused before it begins, not with an error inside it
            refused = chat(tough_node, stream=stream)
            assert refused.status_code == 503 and refused.headers["retry-after"]
            assert "requests waiting, its limit" in refused.json()["error"]["message"]
    finally:
        first.join(timeout=120)
    assert answered[0].status_code == 200
    wait_for(lambda: sum(tough_node.state()["queues"].values()) == 0, 10, "the queue to empty")
    assert chat(tough_node).status_code == 200


def test_maintenance_drain_refuses_new_work_until_normal(tough_node: RunningNode) -> None:
    def maintenance(mode: str) -> httpx.Response:
        return httpx.post(f"{tough_node.url}/control/maintenance", json={"mode": mode}, timeout=10)

    try:
        assert maintenance("drain").status_code == 200
        state = tough_node.state()
        assert state["mode"] == "drain"
        wait_for(lambda: tough_node.state()["nodes"][state["nodeId"]]["mode"] == "drain", 10,
                 "the cluster to see the node drain")
        refused = chat(tough_node)
        assert refused.status_code == 503 and "maintenance" in refused.json()["error"]["message"]
        assert httpx.get(f"{tough_node.url}/health", timeout=5).json()["status"] == "draining"
        # alone, the node has nowhere to move its instance: draining it frees its memory
        wait_for(lambda: not tough_node.state()["instances"], 20, "the idle instance to leave the draining node")
    finally:
        assert maintenance("normal").status_code == 200
    assert maintenance("sideways").status_code == 400
    response = chat(tough_node)  # places the model again
    assert response.status_code == 200, response.text
    assert tough_node.state()["mode"] == "normal"
    wait_for(lambda: whole_runner_ready(tough_node), 60, "the new instance to be ready")
    time.sleep(0.1)
    assert_clean_log(tough_node)
