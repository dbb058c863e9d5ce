"""`apply(state, event)`: each event's effect, strict index order, and states that never change in place."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from exo.shared.apply import TASKS_KEPT, EventOutOfOrder, apply, apply_all
from exo.shared.events import (
    BaseEvent,
    InstanceCreated,
    InstanceDeleted,
    MasterElected,
    NodeJoined,
    NodeLeft,
    NodeProfileUpdated,
    RunnerRemoved,
    RunnerUpdated,
    TaskUpdated,
)
from exo.shared.runners import RunnerInfo, RunnerStatus, TaskInfo, TaskKind, TaskStatus
from exo.shared.state import Instance, NodeProfile, ShardAssignment, State
from exo.shared.types import InstanceId, NodeId


def profile(node_id: str, memory_available: int = 8 << 30) -> NodeProfile:
    return NodeProfile(node_id=NodeId(node_id), hostname=node_id, version="0.1.0", address="10.0.0.1",
                       api_port=52415, memory_total=16 << 30, memory_available=memory_available, cpu_count=8,
                       accelerator="cpu", mlx_device="cpu")


def instance(instance_id: str, *node_ids: str) -> Instance:
    shards = tuple(ShardAssignment(node_id=NodeId(n), rank=r, start=2 * r, end=2 * r + 2)
                   for r, n in enumerate(node_ids))
    return Instance(instance_id=InstanceId(instance_id), model_id="tiny", n_layers=2 * len(node_ids), shards=shards)


def runner(instance_id: str, rank: int, node_id: str, status: RunnerStatus = RunnerStatus.IDLE) -> RunnerInfo:
    return RunnerInfo(instance_id=InstanceId(instance_id), rank=rank, node_id=NodeId(node_id), status=status,
                      start=rank, end=rank + 1, host="10.0.0.1", port=7000 + rank)


def task(task_id: str, status: TaskStatus = TaskStatus.RUNNING) -> TaskInfo:
    return TaskInfo(task_id=task_id, instance_id=InstanceId("i1"), rank=0, kind=TaskKind.LOAD, status=status)


def history(term: int = 1) -> list[BaseEvent]:
    """A master elected, two nodes joining, one updated, an instance created: indices 0..4."""
    return [
        MasterElected(index=0, term=term, node_id=NodeId("a")),
        NodeJoined(index=1, term=term, profile=profile("a")),
        NodeJoined(index=2, term=term, profile=profile("b")),
        NodeProfileUpdated(index=3, term=term, profile=profile("b", memory_available=1 << 30)),
        InstanceCreated(index=4, term=term, instance=instance("i1", "a", "b")),
    ]


BUILT = apply_all(State(), history())


def test_master_elected_sets_the_master_and_raises_the_term() -> None:
    state = apply(BUILT, MasterElected(index=5, term=3, node_id=NodeId("b")))
    assert state.master_id == "b" and state.term == 3 and state.last_event_index == 5


def test_an_event_of_an_older_term_never_lowers_the_states_term() -> None:
    state = apply(BUILT.model_copy(update={"term": 4}), NodeJoined(index=5, term=2, profile=profile("c")))
    assert state.term == 4


def test_node_joined_adds_the_node() -> None:
    state = apply(BUILT, NodeJoined(index=5, term=1, profile=profile("c")))
    assert set(state.nodes) == {"a", "b", "c"} and state.nodes[NodeId("c")] == profile("c")


def test_node_profile_updated_replaces_the_profile() -> None:
    assert BUILT.nodes[NodeId("b")].memory_available == 1 << 30
    state = apply(BUILT, NodeProfileUpdated(index=5, term=1, profile=profile("b", memory_available=2 << 30)))
    assert state.nodes[NodeId("b")].memory_available == 2 << 30 and set(state.nodes) == {"a", "b"}


def test_node_left_removes_the_node_and_keeps_the_others() -> None:
    state = apply(BUILT, NodeLeft(index=5, term=1, node_id=NodeId("a")))
    assert set(state.nodes) == {"b"} and state.instances == BUILT.instances


def test_node_left_for_an_unknown_node_only_advances_the_index() -> None:
    state = apply(BUILT, NodeLeft(index=5, term=1, node_id=NodeId("zz")))
    assert state == BUILT.model_copy(update={"last_event_index": 5})


def test_instance_created_and_deleted() -> None:
    created = apply(BUILT, InstanceCreated(index=5, term=1, instance=instance("i2", "b")))
    assert set(created.instances) == {"i1", "i2"} and created.instances[InstanceId("i2")].node_ids == ("b",)
    deleted = apply(created, InstanceDeleted(index=6, term=1, instance_id=InstanceId("i1")))
    assert set(deleted.instances) == {"i2"} and deleted.last_event_index == 6


def test_apply_all_is_apply_in_sequence() -> None:
    state = State()
    for event in history():
        state = apply(state, event)
    assert apply_all(State(), history()) == state
    assert state.last_event_index == 4 and state.master_id == "a" and set(state.nodes) == {"a", "b"}
    assert apply_all(BUILT, []) is BUILT


@pytest.mark.parametrize("index", [6, 7, 4, 0])  # a negative index is refused at decode
def test_an_event_that_is_not_the_next_one_is_refused(index: int) -> None:
    with pytest.raises(EventOutOfOrder, match=f"event {index} does not follow 4"):
        apply(BUILT, NodeLeft(index=index, term=1, node_id=NodeId("a")))


def test_apply_all_stops_at_a_gap() -> None:
    events = history()
    with pytest.raises(EventOutOfOrder):
        apply_all(State(), [*events[:2], *events[3:]])
    with pytest.raises(EventOutOfOrder):
        apply_all(State(), [events[1], events[0]])


def test_an_event_type_without_a_rule_is_refused() -> None:
    class Unruled(BaseEvent):
        pass

    with pytest.raises(TypeError, match="Unruled"):
        apply(BUILT, Unruled(index=5, term=1))


def test_applying_leaves_the_original_state_unchanged() -> None:
    before = BUILT.model_dump()
    nodes, instances = BUILT.nodes, BUILT.instances
    apply_all(BUILT, [
        MasterElected(index=5, term=2, node_id=NodeId("b")),
        NodeJoined(index=6, term=2, profile=profile("c")),
        NodeProfileUpdated(index=7, term=2, profile=profile("a", memory_available=0)),
        NodeLeft(index=8, term=2, node_id=NodeId("b")),
        InstanceCreated(index=9, term=2, instance=instance("i2", "c")),
        InstanceDeleted(index=10, term=2, instance_id=InstanceId("i1")),
    ])
    assert BUILT.model_dump() == before and BUILT.nodes is nodes and BUILT.instances is instances
    assert set(nodes) == {"a", "b"} and set(instances) == {"i1"}


def test_a_state_cannot_be_changed_in_place() -> None:
    with pytest.raises(ValidationError):
        BUILT.last_event_index = 99  # type: ignore[misc]


WITH_RUNNERS = apply_all(BUILT, [
    InstanceCreated(index=5, term=1, instance=instance("i2", "b", "a")),
    *(RunnerUpdated(index=6 + n, term=1, runner=r) for n, r in enumerate(
        [runner("i1", 0, "a"), runner("i1", 1, "b"), runner("i2", 0, "b"), runner("i2", 1, "a")])),
])  # indices 0..9


def test_runner_updated_adds_the_runner_under_its_id() -> None:
    assert set(WITH_RUNNERS.runners) == {"i1.0", "i1.1", "i2.0", "i2.1"}
    assert WITH_RUNNERS.runners["i2.1"] == runner("i2", 1, "a") and WITH_RUNNERS.last_event_index == 9


def test_runner_updated_replaces_the_runner() -> None:
    state = apply(WITH_RUNNERS, RunnerUpdated(index=10, term=1, runner=runner("i1", 1, "b", RunnerStatus.READY)))
    assert state.runners["i1.1"].status == RunnerStatus.READY
    assert {k: v for k, v in state.runners.items() if k != "i1.1"} == {
        k: v for k, v in WITH_RUNNERS.runners.items() if k != "i1.1"}


@pytest.mark.parametrize(("event", "left"), [
    (RunnerRemoved(index=10, term=1, runner_id="i1.1"), {"i1.0", "i2.0", "i2.1"}),
    (RunnerRemoved(index=10, term=1, runner_id="i9.0"), {"i1.0", "i1.1", "i2.0", "i2.1"}),
    (InstanceDeleted(index=10, term=1, instance_id=InstanceId("i1")), {"i2.0", "i2.1"}),
    (NodeLeft(index=10, term=1, node_id=NodeId("a")), {"i1.1", "i2.0"}),
    (NodeLeft(index=10, term=1, node_id=NodeId("zz")), {"i1.0", "i1.1", "i2.0", "i2.1"}),
], ids=["runner_removed", "unknown_runner_removed", "instance_deleted", "node_left", "unknown_node_left"])
def test_runners_leave_with_their_runner_id_instance_or_node(event: BaseEvent, left: set[str]) -> None:
    state = apply(WITH_RUNNERS, event)
    assert set(state.runners) == left and all(state.runners[k] == WITH_RUNNERS.runners[k] for k in left)


def test_task_updated_adds_the_task_as_the_newest() -> None:
    state = apply_all(BUILT, [TaskUpdated(index=5, term=1, task=task("t1")),
                              TaskUpdated(index=6, term=1, task=task("t2"))])
    assert list(state.tasks) == ["t1", "t2"] and state.tasks["t2"] == task("t2")


def test_task_updated_replaces_the_task_by_id_and_makes_it_the_newest() -> None:
    state = apply_all(BUILT, [TaskUpdated(index=5 + n, term=1, task=task(t)) for n, t in enumerate(["t1", "t2", "t3"])])
    state = apply(state, TaskUpdated(index=8, term=1, task=task("t1", TaskStatus.COMPLETE)))
    assert list(state.tasks) == ["t2", "t3", "t1"] and state.tasks["t1"].status == TaskStatus.COMPLETE


@pytest.mark.parametrize("n", [TASKS_KEPT - 1, TASKS_KEPT, TASKS_KEPT + 1, 3 * TASKS_KEPT])
def test_only_the_newest_tasks_are_kept(n: int) -> None:
    state = apply_all(BUILT, [TaskUpdated(index=5 + k, term=1, task=task(f"t{k}")) for k in range(n)])
    assert list(state.tasks) == [f"t{k}" for k in range(max(0, n - TASKS_KEPT), n)]


def test_a_replaced_old_task_survives_the_trim_in_place_of_the_next_oldest() -> None:
    events = [TaskUpdated(index=5 + k, term=1, task=task(f"t{k}")) for k in range(TASKS_KEPT)]
    state = apply_all(BUILT, [*events, TaskUpdated(index=5 + TASKS_KEPT, term=1, task=task("t0", TaskStatus.FAILED)),
                              TaskUpdated(index=6 + TASKS_KEPT, term=1, task=task("new"))])
    assert len(state.tasks) == TASKS_KEPT and "t1" not in state.tasks
    assert list(state.tasks)[-2:] == ["t0", "new"] and state.tasks["t0"].status == TaskStatus.FAILED
