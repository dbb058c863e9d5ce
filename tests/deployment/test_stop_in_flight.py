"""A node stopped (as systemd stops it: SIGTERM) while it streams a chat: the stream ends as a failed one,
an error event then [DONE], the node exits 0 with no runner left, and its log holds no traceback, which
validate-deployment.sh would count as a bug. The chat is counted once in the stop's log line."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx
import pytest
from nodes import RunningNode, answers, start_node, stop_node, wait_for

pytestmark = pytest.mark.slow


def stream_until_cut(node: RunningNode, started: threading.Event, events: list[str]) -> None:
    body = {"model": httpx.get(node.url + "/v1/models").json()["data"][0]["id"], "stream": True,
            "max_tokens": 4000, "temperature": 0,  # greedy: this prompt runs to hundreds of tokens
            "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]}
    with httpx.stream("POST", node.url + "/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if len(events) > 3:
                    started.set()
    started.set()


def running_node(tmp_path: Path, models_dir: Path, env: dict[str, str]) -> RunningNode:
    node = start_node(tmp_path / "node", models_dir, "--no-discovery", env=env)
    wait_for(lambda: answers(node) and httpx.get(node.url + "/health").json()["runners_ready"] == 1, 120,
             "the node's runner to be ready")
    return node


@pytest.mark.parametrize("signals", [1, 2], ids=["phase 1 times out", "a second SIGTERM"])
def test_a_stop_with_a_stream_in_flight_ends_it_with_an_error_and_logs_no_traceback(
        tmp_path: Path, models_dir: Path, signals: int) -> None:
    # One signal: phase 1 gives the chat 1 s. Two: phase 1 would wait 60 s, the second signal cuts it short.
    timeout = "1" if signals == 1 else "60"
    node = running_node(tmp_path, models_dir, {"EXO_SHUTDOWN_TIMEOUT": timeout, "EXO_CHANNEL_DRAIN_TIMEOUT": "2"})
    started, events = threading.Event(), []
    reader = threading.Thread(target=stream_until_cut, args=(node, started, events))
    reader.start()
    try:
        assert started.wait(60) and len(events) > 3, events
        assert httpx.get(node.url + "/health").json()["in_flight"] == 1
        for _ in range(signals):
            node.process.send_signal(signal.SIGTERM)
            wait_for(lambda: "stopping" in node.log.read_text(), 10, "the node to start stopping")
        reader.join(30)
        assert not reader.is_alive(), "the stream did not end"
    finally:
        code = stop_node(node)
        reader.join(5)
    log = node.log.read_text()
    assert code == 0, log[-3000:]
    assert events[-1] == "[DONE]" and "error" in json.loads(events[-2]), events[-3:]
    assert "Traceback" not in log and "Exception in" not in log and "CancelledError" not in log, log[-3000:]
    if signals == 1:
        assert "1 requests still in flight after 1s" in log, log[-3000:]
