"""Real nodes on loopback: only nodes holding the cluster secret join, and the API key guards the API.

Every node is given every other as a static peer, so the intruders really talk to the cluster (and
it to them) for the whole test, not just at start.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from nodes import SMALL_NODE, RunningNode, running_nodes, start_node, stop_node, wait_for

from exo.local_cluster import NODE_ENV
from exo.models.cards import DEFAULT_MODEL

pytestmark = pytest.mark.slow

SECRET, KEY = "the-cluster-secret", "sk-the-cluster-api-key"
HEARTBEAT = float(NODE_ENV["EXO_HEARTBEAT_INTERVAL"])


def state(node: RunningNode, key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{node.url}/state", headers=headers, timeout=5).json()


def members(node: RunningNode, key: str) -> int:
    try:
        return len(state(node, key)["nodes"])
    except httpx.HTTPError:
        return 0


def agreed(nodes: list[RunningNode], key: str | None = None) -> bool:
    """The nodes name one master and hold one state, with exactly themselves as members."""
    try:
        states = [state(node, key) for node in nodes]
    except httpx.HTTPError:
        return False
    views = {(s["masterId"], s["term"], frozenset(s["nodes"])) for s in states}
    return (len(views) == 1 and states[0]["masterId"] is not None
            and set(states[0]["nodes"]) == {s["nodeId"] for s in states})


def all_peers(i: int, ports: list[int]) -> list[str]:
    return ["--no-discovery", "--peers", ",".join(f"127.0.0.1:{p}" for j, p in enumerate(ports) if j != i)]


def test_nodes_without_the_cluster_secret_never_join(tmp_path: Path, models_dir: Path) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n")
    secrets = [["--cluster-secret", SECRET], ["--cluster-secret-file", str(tmp_path / "secret")],
               ["--cluster-secret", "a-wrong-cluster-secret"], []]

    def flags(i: int, ports: list[int]) -> list[str]:
        return [*all_peers(i, ports), *secrets[i]]

    homes = [tmp_path / name for name in ("good0", "good1", "wrong", "none")]
    with running_nodes(homes, models_dir, "--no-preload", *SMALL_NODE, per_node=flags) as nodes:
        good, intruders = nodes[:2], nodes[2:]
        wait_for(lambda: agreed(good), 30, "the two nodes with the secret agree")
        intruder_ids = {state(node)["nodeId"] for node in intruders}
        time.sleep(12 * HEARTBEAT)  # the intruders keep heartbeating at the cluster all the while

        for node in good:
            seen = state(node)
            assert len(seen["nodes"]) == 2 and not intruder_ids & set(seen["nodes"])
            assert not intruder_ids & set(seen["peers"])
            assert not any(r["nodeId"] in intruder_ids for r in seen["runners"].values())

        # no runner for them either: the master cannot place on a node it does not know
        master = next(node for node in good if state(node)["isMaster"])
        wanting = httpx.post(f"{master.url}/place_instance", json={"model_id": DEFAULT_MODEL, "min_nodes": 3},
                             timeout=10)
        assert wanting.status_code == 409, wanting.text
        shards = [{"node_id": node_id, "rank": 0, "start": 0, "end": 30} for node_id in sorted(intruder_ids)[:1]]
        explicit = httpx.post(f"{master.url}/instance", json={"model_id": DEFAULT_MODEL, "shards": shards}, timeout=10)
        assert explicit.status_code == 400 and "Unknown node" in explicit.json()["error"]["message"]
        for node in intruders:
            assert httpx.get(f"{node.url}/health").json()["runners"] == {}

        # the good nodes say whom they refused; the intruders are told (401) and say so
        for node in good:
            assert "cluster: refused messages from host=127.0.0.1" in node.log.read_text()
        for node in intruders:
            assert any(f"peer 127.0.0.1:{g.port} refused our messages (401)" in node.log.read_text() for g in good)
        assert "no cluster secret set: any node on this network can join" in intruders[1].log.read_text()
        assert "no cluster secret set" not in good[0].log.read_text()


def test_the_api_key_guards_every_endpoint_but_health(tmp_path: Path, models_dir: Path) -> None:
    def flags(i: int, ports: list[int]) -> list[str]:
        return [*all_peers(i, ports), "--cluster-secret", SECRET, "--api-key", KEY]

    auth = {"Authorization": f"Bearer {KEY}"}
    with running_nodes([tmp_path / "a", tmp_path / "b"], models_dir, "--no-preload", *SMALL_NODE,
                       per_node=flags) as nodes:
        wait_for(lambda: agreed(nodes, KEY), 30, "two nodes with one key and one secret agree")
        follower = next(node for node in nodes if not state(node, KEY)["isMaster"])

        for path in ("/v1/models", "/state"):
            for headers in ({}, {"Authorization": "Bearer not-the-key"}):
                refused = httpx.get(follower.url + path, headers=headers)
                assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
                assert refused.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
            assert httpx.get(follower.url + path, headers=auth).status_code == 200
        assert httpx.get(f"{follower.url}/health").status_code == 200
        assert httpx.get(f"{follower.url}/").status_code == 200
        assert httpx.get(f"{follower.url}/dashboard/app.js").status_code == 200  # it asks for the key
        refused = httpx.post(f"{follower.url}/place_instance", json={"model_id": DEFAULT_MODEL})
        assert refused.status_code == 401

        # a master command sent to the follower reaches the master with the follower's key: the
        # planner's own refusal (the cluster has 2 nodes, not 3) comes back
        forwarded = httpx.post(f"{follower.url}/place_instance", json={"model_id": DEFAULT_MODEL, "min_nodes": 3},
                               headers=auth, timeout=10)
        assert forwarded.status_code == 409 and "machine" in forwarded.json()["error"]["message"], forwarded.text

        # a node of the cluster with another key joins (it holds the secret) but the master refuses
        # what it forwards, and it says why
        other = start_node(tmp_path / "other", models_dir, "--no-preload", "--cluster-secret", SECRET,
                           "--api-key", "sk-another-api-key-0", *all_peers(2, [*(n.port for n in nodes), 0]))
        try:
            wait_for(lambda: members(other, "sk-another-api-key-0") == 3, 30, "the third node joins")
            answer = httpx.post(f"{other.url}/place_instance", json={"model_id": DEFAULT_MODEL, "min_nodes": 3},
                                headers={"Authorization": "Bearer sk-another-api-key-0"}, timeout=10)
            assert answer.status_code == 500 and "same --api-key" in answer.json()["error"]["message"], answer.text
        finally:
            assert stop_node(other) == 0, other.log.read_text()[-3000:]


def test_a_chat_forwarded_between_nodes_that_share_a_key(tmp_path: Path, models_dir: Path) -> None:
    def flags(i: int, ports: list[int]) -> list[str]:
        return [*all_peers(i, ports), "--cluster-secret", SECRET, "--api-key", KEY]

    auth = {"Authorization": f"Bearer {KEY}"}
    with running_nodes([tmp_path / "head", tmp_path / "front"], models_dir, "--no-preload", per_node=flags) as nodes:
        head, front = nodes
        wait_for(lambda: agreed(nodes, KEY), 30, "two nodes with one key and one secret agree")
        shards = [{"node_id": state(head, KEY)["nodeId"], "rank": 0, "start": 0, "end": 30}]
        placed = httpx.post(f"{front.url}/instance", json={"model_id": DEFAULT_MODEL, "shards": shards},
                            headers=auth, timeout=10)
        assert placed.status_code == 200, placed.text
        wait_for(lambda: httpx.get(f"{head.url}/health").json()["runners_ready"] == 1, 120, "the head's runner")

        chat = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        assert httpx.post(f"{front.url}/v1/chat/completions", json=chat, timeout=60).status_code == 401
        answer = httpx.post(f"{front.url}/v1/chat/completions", json=chat, headers=auth, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(f"{front.url}/health").json()["runners"] == {}  # the head served it, not the front
