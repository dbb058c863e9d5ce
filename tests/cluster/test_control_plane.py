"""Three real nodes on loopback agree on a master and a state, and survive losing the master."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import httpx
import pytest
from nodes import RunningNode, answers, running_nodes, start_node, static_peers, untag, wait_for

from exo.models.cards import DEFAULT_MODEL

pytestmark = pytest.mark.slow


def agreed(nodes: list[RunningNode], n_members: int) -> bool:
    """All nodes name the same master and term and hold the same state with every member in it."""
    try:
        states = [node.state() for node in nodes]
    except httpx.HTTPError:
        return False
    views = {(s["masterId"], s["term"], s["lastEventIndex"], tuple(sorted(s["nodes"]))) for s in states}
    return len(views) == 1 and states[0]["masterId"] is not None and len(states[0]["nodes"]) == n_members


def ports(nodes: list[RunningNode]) -> list[int]:
    return [node.port for node in nodes]


def test_three_nodes_with_static_peers_elect_one_master_and_survive_its_loss(tmp_path: Path,
                                                                             models_dir: Path) -> None:
    homes = [tmp_path / f"node{i}" for i in range(3)]
    with running_nodes(homes, models_dir, "--no-preload", per_node=static_peers) as nodes:
        wait_for(lambda: agreed(nodes, 3), 30, "three nodes agree")
        before = nodes[0].state()
        assert before["term"] >= 1 and sum(node.state()["isMaster"] for node in nodes) == 1

        master = next(node for node in nodes if node.state()["isMaster"])
        master.process.send_signal(signal.SIGKILL)
        survivors = [node for node in nodes if node is not master]
        took = wait_for(lambda: agreed(survivors, 2), 15, "the survivors elect a new master")

        after = survivors[0].state()
        assert after["term"] > before["term"]
        assert after["masterId"] != before["masterId"] and before["masterId"] not in after["nodes"]
        print(f"new master after {took:.1f}s")

        # the term is persisted: a restarted node never goes back to an older one
        assert int((survivors[0].home / "term").read_text()) == after["term"]

        # the old master comes back with its identity and rejoins as a follower
        back = start_node(master.home, models_dir, "--no-preload", *static_peers(nodes.index(master), ports(nodes)),
                          port=master.port)
        nodes[nodes.index(master)] = back
        wait_for(lambda: agreed(nodes, 3), 30, "the old master rejoins")
        assert back.state()["nodeId"] == before["masterId"] and not back.state()["isMaster"]
        assert back.state()["term"] == after["term"]


def test_nodes_find_each_other_with_zeroconf(tmp_path: Path, models_dir: Path) -> None:
    cluster = f"test-{uuid.uuid4().hex[:8]}"  # so nodes of other test runs are not ours
    homes = [tmp_path / f"node{i}" for i in range(3)]
    with running_nodes(homes, models_dir, "--no-preload", "--cluster", cluster) as nodes:
        wait_for(lambda: agreed(nodes, 3), 30, "three nodes discover each other and agree")


def test_nodes_of_another_cluster_stay_apart(tmp_path: Path, models_dir: Path) -> None:
    def two_clusters(i: int, ports: list[int]) -> list[str]:
        return [*static_peers(i, ports), "--cluster", "blue" if i < 2 else "green"]

    with running_nodes([tmp_path / "a", tmp_path / "b", tmp_path / "c"], models_dir, "--no-preload",
                       per_node=two_clusters) as nodes:
        wait_for(lambda: agreed(nodes[:2], 2), 30, "the blue nodes agree")
        wait_for(lambda: agreed(nodes[2:], 1), 30, "the green node is its own master")
        assert nodes[2].state()["nodeId"] not in nodes[0].state()["nodes"]


def test_instances_api_on_any_node_reaches_the_master(tmp_path: Path, models_dir: Path) -> None:
    homes = [tmp_path / f"node{i}" for i in range(2)]
    with running_nodes(homes, models_dir, "--no-preload", "--max-memory", "220MB", "--context", "128",
                       per_node=static_peers) as nodes:
        wait_for(lambda: agreed(nodes, 2), 30, "two nodes agree")
        follower = next(node for node in nodes if not node.state()["isMaster"])

        previews = httpx.get(f"{follower.url}/instance/previews", params={"model_id": DEFAULT_MODEL}).json()
        assert [len(p["shards"]) for p in previews["previews"]] == [2]  # the 98 MB file, held as stored, needs both

        placed = httpx.post(f"{follower.url}/place_instance", json={"model_id": DEFAULT_MODEL}, timeout=10)
        assert placed.status_code == 200, placed.text
        instance = untag(placed.json())
        assert [(s["start"], s["end"]) for s in instance["shards"]] == [(0, 15), (15, 30)]
        wait_for(lambda: all(instance["instanceId"] in n.state()["instances"] for n in nodes), 10,
                 "every node sees the instance")
        assert untag(httpx.get(f"{nodes[0].url}/instance/{instance['instanceId']}").json()) == instance

        refused = httpx.post(f"{follower.url}/place_instance", json={"model_id": DEFAULT_MODEL, "min_nodes": 3})
        assert refused.status_code == 409 and "machine" in refused.json()["error"]["message"]

        deleted = httpx.delete(f"{follower.url}/instance/{instance['instanceId']}", timeout=10)
        assert deleted.status_code == 200, deleted.text
        wait_for(lambda: not any(n.state()["instances"] for n in nodes), 10, "every node drops the instance")
        assert httpx.get(f"{nodes[0].url}/node_id").json() == nodes[0].state()["nodeId"]
        assert answers(nodes[0])
