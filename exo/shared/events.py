"""Every change to the cluster state, as the master orders it. Each carries its index and term."""

from __future__ import annotations

from typing import Union

from exo.shared.state import Instance, NodeProfile
from exo.shared.types import FrozenModel, InstanceId, NodeId


class BaseEvent(FrozenModel):
    index: int
    term: int


class MasterElected(BaseEvent):
    node_id: NodeId


class NodeJoined(BaseEvent):
    profile: NodeProfile


class NodeProfileUpdated(BaseEvent):
    profile: NodeProfile


class NodeLeft(BaseEvent):
    node_id: NodeId


class InstanceCreated(BaseEvent):
    instance: Instance


class InstanceDeleted(BaseEvent):
    instance_id: InstanceId


Event = Union[MasterElected, NodeJoined, NodeProfileUpdated, NodeLeft, InstanceCreated, InstanceDeleted]
EVENT_TYPES: tuple[type[BaseEvent], ...] = (MasterElected, NodeJoined, NodeProfileUpdated, NodeLeft,
                                            InstanceCreated, InstanceDeleted)
