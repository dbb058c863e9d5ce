"""`plan(node_id, state, local)`: which runners this node starts, stops and moves on, from plain snapshots."""

from __future__ import annotations

import pytest

from exo.shared.runners import RunnerInfo, RunnerStatus, TaskKind, runner_id
from exo.shared.state import Instance, ShardAssignment, State
from exo.shared.types import InstanceId, NodeId
from exo.worker.plan import LocalRunner, Restart, Send, Spawn, Stop, plan, ring_hosts

ME = NodeId("a")


def instance(instance_id: str, *node_ids: str) -> Instance:
    shards = tuple(ShardAssignment(node_id=NodeId(n), rank=r, start=2 * r, end=2 * r + 2)
                   for r, n in enumerate(node_ids))
    return Instance(instance_id=InstanceId(instance_id), model_id="tiny", n_layers=2 * len(node_ids), shards=shards)


def reported(inst: Instance, *ranks: int) -> dict[str, RunnerInfo]:
    """The RunnerInfo each of `ranks` reports, listening on port 7000 + rank of its node's host."""
    return {runner_id(inst.instance_id, r): RunnerInfo(instance_id=inst.instance_id, rank=r,
                                                       node_id=inst.shards[r].node_id, status=RunnerStatus.IDLE,
                                                       start=inst.shards[r].start, end=inst.shards[r].end,
                                                       host=f"host-{inst.shards[r].node_id}", port=7000 + r)
            for r in ranks}


def state(*instances: Instance, runners: dict[str, RunnerInfo] | None = None) -> State:
    return State(instances={i.instance_id: i for i in instances}, runners=runners or {})


def idle(busy: bool = False) -> LocalRunner:
    return LocalRunner(RunnerStatus.IDLE, busy=busy)


SOLO = instance("solo", "a")
RING = instance("ring", "b", "a", "c")  # this node holds rank 1


def test_a_shard_on_this_node_without_a_runner_is_spawned() -> None:
    assert plan(ME, state(SOLO, RING), {}) == [Spawn(SOLO, SOLO.shards[0]), Spawn(RING, RING.shards[1])]


def test_shards_of_other_nodes_are_ignored() -> None:
    elsewhere = instance("elsewhere", "b", "c")
    assert plan(ME, state(elsewhere), {}) == []
    assert plan(ME, state(elsewhere), {"elsewhere.0": idle()}) == [Stop("elsewhere.0")]  # not ours to run


@pytest.mark.parametrize("status", list(RunnerStatus))
def test_a_runner_whose_instance_is_gone_is_stopped(status: RunnerStatus) -> None:
    local = {"gone.0": LocalRunner(status, busy=False), "solo.0": LocalRunner(RunnerStatus.READY, busy=False)}
    assert plan(ME, state(SOLO), local) == [Stop("gone.0")]


def test_an_unassigned_runner_is_stopped_even_while_busy() -> None:
    assert plan(ME, state(), {"gone.0": LocalRunner(RunnerStatus.LOADING, busy=True)}) == [Stop("gone.0")]


@pytest.mark.parametrize(("status", "task"), [
    (RunnerStatus.IDLE, TaskKind.LOAD),  # one rank: no ring to connect
    (RunnerStatus.CONNECTED, TaskKind.LOAD),
    (RunnerStatus.LOADED, TaskKind.WARMUP),
])
def test_a_single_shard_runner_gets_its_next_lifecycle_task(status: RunnerStatus, task: TaskKind) -> None:
    assert plan(ME, state(SOLO), {"solo.0": LocalRunner(status, busy=False)}) == [Send("solo.0", task)]


@pytest.mark.parametrize("ranks", [(), (1,), (0, 1), (1, 2)])
def test_a_ring_runner_waits_until_every_rank_has_reported(ranks: tuple[int, ...]) -> None:
    s = state(RING, runners=reported(RING, *ranks))
    assert ring_hosts(RING, s) is None
    assert plan(ME, s, {"ring.1": idle()}) == []


def test_a_ring_runner_connects_to_every_rank_in_rank_order() -> None:
    s = state(RING, runners=reported(RING, 2, 0, 1))
    hosts = ("host-b:7000", "host-a:7001", "host-c:7002")
    assert ring_hosts(RING, s) == hosts
    assert plan(ME, s, {"ring.1": idle()}) == [Send("ring.1", TaskKind.CONNECT, hosts)]


@pytest.mark.parametrize(("status", "task"), [
    (RunnerStatus.CONNECTED, TaskKind.LOAD),
    (RunnerStatus.LOADED, TaskKind.WARMUP),
])
def test_a_ring_runner_moves_on_after_connecting(status: RunnerStatus, task: TaskKind) -> None:
    assert plan(ME, state(RING), {"ring.1": LocalRunner(status, busy=False)}) == [Send("ring.1", task)]


@pytest.mark.parametrize("status", [s for s in RunnerStatus
                                    if s not in (RunnerStatus.IDLE, RunnerStatus.CONNECTED, RunnerStatus.LOADED)])
@pytest.mark.parametrize("rid", ["solo.0", "ring.1"])
def test_a_runner_in_any_other_status_gets_nothing(status: RunnerStatus, rid: str) -> None:
    s = state(SOLO, RING, runners=reported(RING, 0, 1, 2))
    local = {"solo.0": idle(busy=True), "ring.1": idle(busy=True), rid: LocalRunner(status, busy=False)}
    assert plan(ME, s, local) == []


@pytest.mark.parametrize("status", list(RunnerStatus))
def test_a_busy_assigned_runner_gets_nothing(status: RunnerStatus) -> None:
    s = state(SOLO, RING, runners=reported(RING, 0, 1, 2))
    assert plan(ME, s, {"solo.0": LocalRunner(status, busy=True), "ring.1": LocalRunner(status, busy=True)}) == []


def test_a_ring_is_joined_only_by_runners_that_joined_no_earlier_ring() -> None:
    runners = reported(RING, 0, 1, 2)
    stale = {**runners, "ring.2": runners["ring.2"].model_copy(update={"status": RunnerStatus.READY})}
    assert plan(ME, state(RING, runners=stale), {"ring.1": idle()}) == []  # rank 2 is still in the old ring
    joining = {**runners, "ring.0": runners["ring.0"].model_copy(update={"status": RunnerStatus.CONNECTING})}
    assert plan(ME, state(RING, runners=joining), {"ring.1": idle()}) == [
        Send("ring.1", TaskKind.CONNECT, ("host-b:7000", "host-a:7001", "host-c:7002"))]


def test_a_runner_whose_ring_peer_started_again_elsewhere_restarts() -> None:
    runners = reported(RING, 0, 1, 2)
    joined = ("host-b:7000", "host-a:7001", "host-c:7002")
    ready = LocalRunner(RunnerStatus.READY, busy=False, hosts=joined)
    assert plan(ME, state(RING, runners=runners), {"ring.1": ready}) == []
    moved = {**runners, "ring.2": runners["ring.2"].model_copy(update={"port": 7999})}
    assert plan(ME, state(RING, runners=moved), {"ring.1": ready}) == [Restart("ring.1")]
    gone = {k: v for k, v in runners.items() if k != "ring.2"}  # unknown is not changed: wait for its report
    assert plan(ME, state(RING, runners=gone), {"ring.1": ready}) == []
