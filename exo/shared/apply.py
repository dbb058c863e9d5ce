"""`apply(state, event) -> State`: the only way the cluster state changes. Pure and total."""

from __future__ import annotations

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
from exo.shared.state import State

TASKS_KEPT = 64  # task records in the state; older ones are dropped


class EventOutOfOrder(ValueError):
    """An event whose index is not the next one; the node must catch up instead of applying it."""


def apply(state: State, event: BaseEvent) -> State:
    if event.index != state.last_event_index + 1:
        raise EventOutOfOrder(f"event {event.index} does not follow {state.last_event_index}")
    update = {"last_event_index": event.index, "term": max(state.term, event.term)}
    match event:
        case MasterElected(node_id=node_id):
            update["master_id"] = node_id
        case NodeJoined(profile=profile) | NodeProfileUpdated(profile=profile):
            update["nodes"] = {**state.nodes, profile.node_id: profile}
        case NodeLeft(node_id=node_id):
            update["nodes"] = {k: v for k, v in state.nodes.items() if k != node_id}
            update["runners"] = {k: r for k, r in state.runners.items() if r.node_id != node_id}
        case InstanceCreated(instance=instance):
            update["instances"] = {**state.instances, instance.instance_id: instance}
        case InstanceDeleted(instance_id=instance_id):
            update["instances"] = {k: v for k, v in state.instances.items() if k != instance_id}
            update["runners"] = {k: r for k, r in state.runners.items() if r.instance_id != instance_id}
        case RunnerUpdated(runner=runner):
            update["runners"] = {**state.runners, runner.runner_id: runner}
        case RunnerRemoved(runner_id=runner_id):
            update["runners"] = {k: r for k, r in state.runners.items() if k != runner_id}
        case TaskUpdated(task=task):
            tasks = {k: t for k, t in state.tasks.items() if k != task.task_id}
            update["tasks"] = dict([*tasks.items(), (task.task_id, task)][-TASKS_KEPT:])
        case _:
            raise TypeError(f"no rule to apply {type(event).__name__}")
    return state.model_copy(update=update)


def apply_all(state: State, events: list[BaseEvent]) -> State:
    for event in events:
        state = apply(state, event)
    return state
