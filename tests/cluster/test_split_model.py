"""The default model, and Gemma 3, split across 2 and 3 real nodes on loopback answer exactly as on one node.

One module-wide cluster of three nodes (static peers, no preload): each case places an
instance by hand with `POST /instance`, asks through every node (the ones without rank 0 hand
the request on), and deletes it. Greedy decoding makes the answers comparable token for token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from nodes import RunningNode, answers, runner_pids, running_nodes, static_peers, wait_for

from exo import local_cluster
from exo.models.cards import DEFAULT_MODEL

pytestmark = pytest.mark.slow

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
MAX_TOKENS = 16
SPLITS = {1: [(0, 30)], 2: [(0, 15), (15, 30)], 3: [(0, 8), (8, 21), (21, 30)]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[list[RunningNode]]:
    root = tmp_path_factory.mktemp("pipeline")
    with running_nodes([root / f"node{i}" for i in range(3)], models_dir, "--no-preload",
                       per_node=static_peers) as nodes:
        wait_for(lambda: all(answers(n) for n in nodes), 30, "the nodes answer")
        wait_for(lambda: all(len(n.state()["nodes"]) == 3 and n.state()["masterId"] for n in nodes), 30,
                 "three nodes agree")
        yield nodes


def place(nodes: list[RunningNode], n: int) -> str:
    """An instance of the default model on the first `n` nodes, once every node sees its runners Ready."""
    return local_cluster.place(nodes, nodes[:n], DEFAULT_MODEL, SPLITS[n], timeout=90)


def delete(nodes: list[RunningNode], instance_id: str) -> None:
    assert httpx.delete(f"{nodes[0].url}/instance/{instance_id}", timeout=10).status_code == 200
    wait_for(lambda: not any(f"{instance_id}" in json.dumps(n.state()["runners"]) for n in nodes), 20,
             "the instance's runners leave the state")


def ask(node: RunningNode, messages: list[dict[str, str]], *, stream: bool) -> str:
    body = {"model": DEFAULT_MODEL, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS,
            "stream": stream}
    response = httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    if not stream:
        return str(response.json()["choices"][0]["message"]["content"])
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not [c for c in chunks if "error" in c], chunks
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


@pytest.fixture(scope="module")
def alone(cluster: list[RunningNode]) -> list[str]:
    """Each prompt's answer with the whole model in one runner."""
    instance_id = place(cluster, 1)
    try:
        return [ask(cluster[0], messages, stream=False) for messages in PROMPTS]
    finally:
        delete(cluster, instance_id)


@pytest.mark.parametrize("n_nodes", [2, 3])
def test_a_model_split_across_nodes_answers_token_for_token_as_on_one(cluster: list[RunningNode], alone: list[str],
                                                                     n_nodes: int) -> None:
    instance_id = place(cluster, n_nodes)
    try:
        state = cluster[2].state()
        runners = [state["runners"][f"{instance_id}.{rank}"] for rank in range(n_nodes)]
        assert [r["nodeId"] for r in runners] == [n.state()["nodeId"] for n in cluster[:n_nodes]]
        assert [(r["start"], r["end"]) for r in runners] == SPLITS[n_nodes]
        assert all(r["status"] == "Ready" and r["pid"] for r in runners)
        assert "Paris" in alone[0]
        for node in cluster:  # the last node holds no shard when n_nodes is 2: it hands requests on
            for stream in (False, True):
                assert [ask(node, messages, stream=stream) for messages in PROMPTS] == alone
        # all at once, through every node: rank 0 queues them and each gets its own answer
        with ThreadPoolExecutor(len(cluster) * len(PROMPTS)) as pool:
            together = pool.map(lambda job: ask(job[0], job[1], stream=job[2]),
                                [(node, m, i % 2 == 0) for i, node in enumerate(cluster) for m in PROMPTS])
        assert list(together) == alone * len(cluster)
    finally:
        delete(cluster, instance_id)
    wait_for(lambda: not [pid for node in cluster for pid in runner_pids(node.process.pid)], 10,
             "the deleted instance's runner processes exit")


def task_record(node: RunningNode, task_id: str) -> dict[str, Any] | None:
    record: dict[str, Any] | None = node.state()["tasks"].get(task_id)
    return record if record and record["status"] in ("Complete", "Failed") else None


def test_a_task_that_does_not_fit_or_raises_fails_alone_and_the_runner_keeps_serving(
        cluster: list[RunningNode], alone: list[str]) -> None:
    instance_id = place(cluster, 2)
    try:
        follower = f"{instance_id}.1"
        cases = [("Load", "a Load task cannot run while the runner is Ready"),  # an invalid transition
                 ("Chat", "rank 1 takes no chat tasks")]                         # a task that raises
        for kind, reason in cases:
            # sent to the node without the runner: it hands the task to the runner's node
            response = httpx.post(f"{cluster[0].url}/runners/{follower}/tasks", json={"kind": kind}, timeout=10)
            assert response.status_code == 200, response.text
            task_id = response.json()["task_id"]
            wait_for(lambda: task_record(cluster[2], task_id) is not None, 20, f"the {kind} task ends")  # noqa: B023
            record = task_record(cluster[2], task_id)
            assert record is not None and (record["kind"], record["status"]) == (kind, "Failed")
            assert reason in record["error"]
            assert cluster[0].state()["runners"][follower]["status"] == "Ready"
            assert ask(cluster[2], PROMPTS[0], stream=True) == alone[0]
        log = cluster[1].log.read_text()
        assert "cannot run while the runner is Ready" in log and "Traceback" not in log
    finally:
        delete(cluster, instance_id)


GEMMA = "gemma3-270m"
GEMMA_SPLITS = {1: [(0, 18)], 2: [(0, 9), (9, 18)], 3: [(0, 6), (6, 12), (12, 18)]}
GEMMA_PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def complete(node: RunningNode, prompt: str) -> str:
    body = {"model": GEMMA, "prompt": prompt, "temperature": 0, "max_tokens": MAX_TOKENS}
    response = httpx.post(f"{node.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def test_gemma_split_across_two_and_three_nodes_completes_text_as_on_one(cluster: list[RunningNode],
                                                                         gemma_path: Path) -> None:
    """The second family (Q4_K_M, sliding-window layers on both sides of each cut) through every node."""
    answers = {}
    for n_nodes, splits in GEMMA_SPLITS.items():
        instance_id = local_cluster.place(cluster, cluster[:n_nodes], GEMMA, splits, timeout=120)
        try:
            answers[n_nodes] = [complete(node, prompt) for node in cluster for prompt in GEMMA_PROMPTS]
        finally:
            delete(cluster, instance_id)
    assert all(answers[1]) and answers[2] == answers[1] and answers[3] == answers[1], answers


def test_a_node_killed_mid_stream_ends_the_stream_with_an_error_and_the_model_moves(
        cluster: list[RunningNode]) -> None:
    """Last in the module: it kills a node of the shared cluster."""
    old = place(cluster, 2)
    victim = cluster[1]
    pids = runner_pids(victim.process.pid)
    assert pids
    body = {"model": DEFAULT_MODEL, "messages": PROMPTS[2], "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{cluster[2].url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        assert "choices" in next(lines)
        victim.process.kill()
        killed = time.monotonic()
        rest = list(lines)
    ended_after = time.monotonic() - killed
    assert rest[-1] == "data: [DONE]" and "error" in json.loads(rest[-2].removeprefix("data: ")), rest[-3:]
    assert ended_after < 15, f"the stream took {ended_after:.1f}s to end"
    wait_for(lambda: not [p for p in pids if _alive(p)], 5, "the killed node's runner dies with it")
    # the master places the model again on the nodes left, and the next request is served
    wait_for(lambda: old not in cluster[0].state()["instances"], 20, "the master to drop the broken instance")
    response = httpx.post(f"{cluster[2].url}/v1/chat/completions", timeout=120,
                          json={"model": DEFAULT_MODEL, "messages": PROMPTS[0], "max_tokens": 4})
    assert response.status_code == 200, response.text
    [instance] = cluster[0].state()["instances"].values()
    assert victim.port not in [s["nodeId"] for s in local_cluster.untag(instance)["shards"]]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
