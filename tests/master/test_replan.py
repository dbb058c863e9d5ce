"""`instances_to_move(state, queues)`: which instances the master places again, and why."""

from __future__ import annotations

from exo.master.replan import eligible_nodes, instances_to_move
from exo.shared.runners import RunnerInfo, RunnerStatus, runner_id
from exo.shared.state import Instance, NodeMode, NodeProfile, ShardAssignment, State
from exo.shared.types import InstanceId, NodeId


def profile(name: str, mode: NodeMode = NodeMode.NORMAL) -> NodeProfile:
    return NodeProfile(node_id=NodeId(name), hostname=name, version="0.1.0", address="127.0.0.1", api_port=1,
                       memory_total=8 << 30, memory_available=8 << 30, cpu_count=2, accelerator="cpu",
                       mlx_device="cpu", mode=mode)


RING = Instance(instance_id=InstanceId("ring"), model_id="tiny", n_layers=4,
                shards=(ShardAssignment(node_id=NodeId("a"), rank=0, start=0, end=2),
                        ShardAssignment(node_id=NodeId("b"), rank=1, start=2, end=4)))


def runner(rank: int, status: RunnerStatus = RunnerStatus.READY, **changes: object) -> RunnerInfo:
    shard = RING.shards[rank]
    return RunnerInfo(instance_id=RING.instance_id, rank=rank, node_id=shard.node_id, start=shard.start,
                      end=shard.end, status=status, host="h", port=7000 + rank).model_copy(update=changes)


def state(*nodes: NodeProfile, runners: tuple[RunnerInfo, ...] = (runner(0), runner(1))) -> State:
    return State(nodes={n.node_id: n for n in nodes}, instances={RING.instance_id: RING},
                 runners={runner_id(r.instance_id, r.rank): r for r in runners})


def reasons(s: State, queues: dict[str, int] | None = None) -> list[str]:
    return [reason for _, reason in instances_to_move(s, queues or {})]


def test_a_healthy_instance_stays() -> None:
    assert reasons(state(profile("a"), profile("b"))) == []


def test_an_instance_whose_node_left_moves() -> None:
    assert reasons(state(profile("a"))) == ["node b left the cluster"]


def test_a_runner_that_is_restarting_keeps_its_instance_but_one_that_gave_up_moves_it() -> None:
    restarting = runner(1, RunnerStatus.FAILED, restarts=1, error="boom")
    assert reasons(state(profile("a"), profile("b"), runners=(runner(0), restarting))) == []
    gave_up = restarting.model_copy(update={"gave_up": True, "restarts": 3})
    assert reasons(state(profile("a"), profile("b"), runners=(runner(0), gave_up))) == [
        "runner ring.1 failed 4 times (boom)"]


def test_an_instance_on_a_draining_node_moves_only_once_idle() -> None:
    draining = state(profile("a"), profile("b", NodeMode.DRAIN))
    assert reasons(draining, {"ring": 2}) == []  # requests queued at its head finish first
    busy = state(profile("a"), profile("b", NodeMode.DRAIN), runners=(runner(0, RunnerStatus.RUNNING), runner(1)))
    assert reasons(busy) == []
    assert reasons(draining) == ["node b is draining"]


def test_draining_nodes_take_no_new_placement() -> None:
    s = state(profile("a"), profile("b", NodeMode.DRAIN), profile("c"))
    assert [n.node_id for n in eligible_nodes(s)] == ["a", "c"]
