"""A node admits chats for its own runners from their handles, not from the cluster state's echo of them."""

from __future__ import annotations

from exo.api.instances import _all_runners
from exo.shared.runners import SERVING, RunnerInfo, RunnerStatus
from exo.shared.state import Instance, ShardAssignment, State
from exo.shared.types import InstanceId, NodeId
from exo.worker.handle import HandleEvent, RunnerHandle
from exo.worker.runner.messages import RunnerSpec
from exo.worker.supervisor import Supervisor

INSTANCE = Instance(instance_id=InstanceId("i1"), model_id="m", n_layers=4,
                    shards=(ShardAssignment(node_id=NodeId("a"), rank=0, start=0, end=2),
                            ShardAssignment(node_id=NodeId("b"), rank=1, start=2, end=4)))


def reported(rank: int, node: str, status: RunnerStatus) -> RunnerInfo:
    return RunnerInfo(instance_id=INSTANCE.instance_id, rank=rank, node_id=NodeId(node), start=0, end=2,
                      status=status, host="127.0.0.1", port=1)


def state(rank0: RunnerStatus, rank1: RunnerStatus) -> State:
    runners = {r.runner_id: r for r in (reported(0, "a", rank0), reported(1, "b", rank1))}
    return State().model_copy(update={"runners": runners})


def test_this_nodes_rank_is_ready_as_its_handle_says_before_the_cluster_state_hears() -> None:
    behind = state(RunnerStatus.WARMING_UP, RunnerStatus.READY)  # the master has not heard of rank 0's Ready
    assert _all_runners(behind, INSTANCE, SERVING, {"i1.0": RunnerStatus.READY}, "a")
    assert not _all_runners(behind, INSTANCE, SERVING, {}, "a")  # no handle taking chats here: not ready


def test_the_other_nodes_ranks_are_as_the_cluster_state_says() -> None:
    assert not _all_runners(state(RunnerStatus.READY, RunnerStatus.LOADING), INSTANCE, SERVING,
                            {"i1.0": RunnerStatus.READY}, "a")


def test_a_runner_that_is_stopping_takes_no_chats_whatever_it_last_reported() -> None:
    supervisor = Supervisor(NodeId("a"), catalog=None, host="127.0.0.1", dtype="float32",  # type: ignore[arg-type]
                            report=lambda *_: None)
    spec = RunnerSpec(node_id="a", instance_id=INSTANCE.instance_id, rank=0, world_size=2, model_path="", start=0,
                      end=2, n_layers=4, dtype="float32")
    handle = RunnerHandle(spec, NodeId("a"), "127.0.0.1", 1, status=RunnerStatus.READY)
    supervisor.runners[handle.runner_id] = handle
    assert supervisor.serving() == {}  # not started: it has not reported yet
    handle.move(HandleEvent.REPORTED)
    assert supervisor.serving() == {"i1.0": RunnerStatus.READY}
    handle.move(HandleEvent.RESTART)
    assert supervisor.serving() == {}
