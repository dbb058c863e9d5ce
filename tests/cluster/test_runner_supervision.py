"""A node's runners under trouble, with real processes: a hung runner is killed and replaced while
/health says why, a runner stopped under a slow stream leaves the node serving, and a cancelled chat
is reported Cancelled.

Every test reads the node's log at the end: no ClosedResourceError and no traceback.
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
    answers,
    assert_clean_log,
    runner_pids,
    serving_node,
    sse_events,
    wait_for,
    whole_runner_ready,
)

from exo.models.cards import DEFAULT_MODEL
from exo.worker.supervisor import STOP_GRACE_SECONDS, WATCHDOG_PERIOD, Limits

pytestmark = pytest.mark.slow

WATCHDOG_TIMEOUT = 5.0
QUESTION = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
# From a runner's last progress to its successor's start: the watchdog's deadline and period, the stop's
# two deadlines (the Shutdown it asks for, then SIGTERM; then SIGKILL), and the first backoff.
REPLACED_WITHIN = WATCHDOG_TIMEOUT + WATCHDOG_PERIOD + 2 * STOP_GRACE_SECONDS + Limits().restart_backoff
LOAD_SECONDS = 60  # for the successor to load the model and warm up, on a loaded machine


def body(max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}


def chat(node: RunningNode, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(f"{node.url}/v1/chat/completions", json=body(max_tokens, False), timeout=120)


def tasks(node: RunningNode) -> dict[str, dict[str, Any]]:
    return {t["taskId"]: t for t in node.state()["tasks"].values() if t["kind"] == "Chat"}


@pytest.fixture(scope="module")
def watched_node(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[RunningNode]:
    with serving_node(tmp_path_factory.mktemp("watched"), models_dir,
                      env={"EXO_WATCHDOG_TIMEOUT": str(WATCHDOG_TIMEOUT)}) as node:
        yield node


def slow_stream_ends_with_an_error(node: RunningNode, trouble: Any) -> list[dict[str, Any] | str]:
    """A streamed chat whose client reads one piece every 0.2 s; `trouble` strikes after the first."""
    with httpx.stream("POST", f"{node.url}/v1/chat/completions", json=body(200, True), timeout=120) as response:
        assert response.status_code == 200
        stream = sse_events(response)
        seen = [next(stream), next(stream)]
        trouble()
        for event in stream:
            seen.append(event)
            time.sleep(0.2)
    return seen


def kill_runner(node: RunningNode) -> None:
    [pid] = runner_pids(node.process.pid)
    os.kill(pid, signal.SIGKILL)


def delete_instance(node: RunningNode) -> None:
    [instance_id] = node.state()["instances"]
    assert httpx.delete(f"{node.url}/instance/{instance_id}", timeout=10).status_code == 200


@pytest.mark.parametrize("trouble", [kill_runner, delete_instance], ids=["runner_killed", "instance_deleted"])
def test_a_slow_stream_whose_runner_stops_ends_with_an_error_and_the_node_serves_on(
        watched_node: RunningNode, trouble: Any) -> None:
    seen = slow_stream_ends_with_an_error(watched_node, lambda: trouble(watched_node))
    assert seen[-1] == "[DONE]"
    errors = [e["error"] for e in seen if isinstance(e, dict) and "error" in e]
    assert errors and "stopped during the request" in errors[0]["message"], seen[-3:]
    assert answers(watched_node)
    if trouble is kill_runner:
        wait_for(lambda: whole_runner_ready(watched_node), REPLACED_WITHIN + LOAD_SECONDS, "the runner to be restarted")
    response = chat(watched_node)  # served by the restarted runner, or a newly placed instance
    assert response.status_code == 200, response.text
    assert_clean_log(watched_node)


def test_a_chat_cancelled_mid_stream_or_before_it_starts_is_reported_cancelled(watched_node: RunningNode) -> None:
    wait_for(lambda: whole_runner_ready(watched_node), LOAD_SECONDS, "the runner to be ready")
    url = f"{watched_node.url}/v1/chat/completions"
    before = set(tasks(watched_node))
    with httpx.stream("POST", url, json=body(200, True), timeout=120) as running:
        stream = sse_events(running)
        next(stream), next(stream)  # generating
        with httpx.stream("POST", url, json=body(200, True), timeout=120) as queued:
            next(sse_events(queued))  # its task is queued behind the first one
            wait_for(lambda: len(set(tasks(watched_node)) - before) == 2, 10, "both chats to reach the runner")
        # the queued client left; now the generating one leaves too
    new = [t for t_id, t in tasks(watched_node).items() if t_id not in before]
    wait_for(lambda: all(tasks(watched_node)[t["taskId"]]["status"] == "Cancelled" for t in new), 30,
             f"both chats to be reported Cancelled: {new}")
    assert chat(watched_node).status_code == 200
    assert_clean_log(watched_node)


def test_a_hung_runner_is_killed_and_replaced_while_health_says_why(watched_node: RunningNode) -> None:
    wait_for(lambda: whole_runner_ready(watched_node), LOAD_SECONDS, "the runner to be ready")
    [pid] = runner_pids(watched_node.process.pid)
    answered: list[list[dict[str, Any] | str]] = []

    def hang() -> None:
        os.kill(pid, signal.SIGSTOP)
        hung_at.append(time.monotonic())

    hung_at: list[float] = []
    client = threading.Thread(target=lambda: answered.append(slow_stream_ends_with_an_error(watched_node, hang)))
    client.start()
    try:
        def stalled() -> bool:
            health = httpx.get(f"{watched_node.url}/health", timeout=5)
            return health.status_code == 503 and "no progress" in health.json().get("reason", "")

        wait_for(stalled, WATCHDOG_TIMEOUT + 5, "/health to say the runner made no progress")
        health = httpx.get(f"{watched_node.url}/health", timeout=5).json()
        assert health["status"] == "stalled" and f"watchdog's {WATCHDOG_TIMEOUT:g}s" in health["reason"]
        wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                 REPLACED_WITHIN + 5, "the hung runner to be killed")
        wait_for(lambda: runner_pids(watched_node.process.pid) not in ([], [pid]), REPLACED_WITHIN + 5,
                 "a new runner to start")
        assert time.monotonic() - hung_at[0] < REPLACED_WITHIN + 5
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGCONT)  # leave nothing stopped behind, whatever failed
        client.join(timeout=120)
    [seen] = answered
    assert seen[-1] == "[DONE]" and any(isinstance(e, dict) and "error" in e for e in seen), seen[-3:]
    wait_for(lambda: whole_runner_ready(watched_node), LOAD_SECONDS, "the new runner to be ready")
    assert httpx.get(f"{watched_node.url}/health", timeout=5).json()["status"] == "ok"
    response = chat(watched_node)
    assert response.status_code == 200, response.text
    assert "did not exit within" in watched_node.log.read_text()
    assert_clean_log(watched_node)
