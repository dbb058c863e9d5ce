"""The cluster's shared state: what every node knows, changed only by applying events in order."""

from __future__ import annotations

from enum import StrEnum

from exo.shared.runners import RunnerInfo, TaskInfo
from exo.shared.types import Count, FrozenModel, Index, InstanceId, NodeId, Port, Small


class NodeMode(StrEnum):
    NORMAL = "normal"
    DRAIN = "drain"  # takes no new work; its instances move elsewhere once idle (maintenance, or stopping)


class NodeProfile(FrozenModel):
    """What a node reports about itself; refreshed while it runs."""

    node_id: NodeId
    hostname: str
    version: str
    address: str
    api_port: Port  # peers send to it: a port no socket takes is refused on arrival
    memory_total: Count
    memory_available: Count
    memory_cap: Count | None = None
    cpu_count: Small
    accelerator: str
    mlx_device: str
    mode: NodeMode = NodeMode.NORMAL

    @property
    def memory_offered(self) -> int:
        """Bytes this node lets exo use: what is available, within the operator's cap."""
        return min(self.memory_available, self.memory_cap) if self.memory_cap else self.memory_available


class ShardAssignment(FrozenModel):
    """One runner of an instance: which node runs which layers, at which rank of the ring."""

    node_id: NodeId
    rank: Small
    start: Small
    end: Small


class Instance(FrozenModel):
    """A model placed on the cluster: one runner per shard, joined in a ring in rank order."""

    instance_id: InstanceId
    model_id: str
    n_layers: Small
    shards: tuple[ShardAssignment, ...]

    @property
    def node_ids(self) -> tuple[NodeId, ...]:
        return tuple(s.node_id for s in self.shards)


class State(FrozenModel):
    last_event_index: Index = -1
    term: Count = 0
    master_id: NodeId | None = None
    nodes: dict[NodeId, NodeProfile] = {}
    instances: dict[InstanceId, Instance] = {}
    runners: dict[str, RunnerInfo] = {}
    tasks: dict[str, TaskInfo] = {}  # the latest few, oldest first
