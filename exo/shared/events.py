"""Every change to the cluster state, as the master orders it. Each carries its index and term.

Each event names its own type in `kind`: some share a shape (NodeLeft and MasterElected), so the
fields alone would decode as the wrong one.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from exo.shared.runners import RunnerInfo, TaskInfo
from exo.shared.state import Instance, NodeProfile
from exo.shared.types import Count, FrozenModel, InstanceId, NodeId


class BaseEvent(FrozenModel):
    index: Count
    term: Count


class MasterElected(BaseEvent):
    kind: Literal["MasterElected"] = "MasterElected"
    node_id: NodeId


class NodeJoined(BaseEvent):
    kind: Literal["NodeJoined"] = "NodeJoined"
    profile: NodeProfile


class NodeProfileUpdated(BaseEvent):
    kind: Literal["NodeProfileUpdated"] = "NodeProfileUpdated"
    profile: NodeProfile


class NodeLeft(BaseEvent):
    kind: Literal["NodeLeft"] = "NodeLeft"
    node_id: NodeId


class InstanceCreated(BaseEvent):
    kind: Literal["InstanceCreated"] = "InstanceCreated"
    instance: Instance


class InstanceDeleted(BaseEvent):
    kind: Literal["InstanceDeleted"] = "InstanceDeleted"
    instance_id: InstanceId


class RunnerUpdated(BaseEvent):
    kind: Literal["RunnerUpdated"] = "RunnerUpdated"
    runner: RunnerInfo


class RunnerRemoved(BaseEvent):
    kind: Literal["RunnerRemoved"] = "RunnerRemoved"
    runner_id: str


class TaskUpdated(BaseEvent):
    kind: Literal["TaskUpdated"] = "TaskUpdated"
    task: TaskInfo


Event = Annotated[MasterElected | NodeJoined | NodeProfileUpdated | NodeLeft | InstanceCreated | InstanceDeleted
                  | RunnerUpdated | RunnerRemoved | TaskUpdated, Field(discriminator="kind")]
EVENT_TYPES: tuple[type[BaseEvent], ...] = (MasterElected, NodeJoined, NodeProfileUpdated, NodeLeft,
                                            InstanceCreated, InstanceDeleted, RunnerUpdated, RunnerRemoved,
                                            TaskUpdated)
