"""The cluster's shared state: what every node knows, changed only by applying events in order."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from pydantic import (
    ModelWrapValidatorHandler,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    computed_field,
    model_serializer,
    model_validator,
)

from exo.shared.runners import RunnerInfo, TaskInfo, runner_id
from exo.shared.types import BYTES_PER_PARAM, Count, Dtype, FrozenModel, Index, InstanceId, NodeId, Port, Small


class NodeMode(StrEnum):
    NORMAL = "normal"
    DRAIN = "drain"  # takes no new work; its instances move elsewhere once idle (maintenance, or stopping)


class SharedModel(FrozenModel):
    """A model a node serves from its own files (`exo --model PATH`): nodes of the cluster that lack them
    fetch from it the bytes their layer range reads (exo/models/peers.py)."""

    model_id: str
    version: str  # changes whenever its files do (their names, sizes and modification times)
    bytes: Count  # of weights, as stored
    n_params: Count
    n_layers: Small
    kv_width: Count  # keys and values one position adds to one layer's cache
    context_length: Count  # the most positions the model was trained for

    def memory_bytes(self, dtype: Dtype) -> int:
        """Bytes the weights take in memory once loaded as `dtype` (quantized: as in the file)."""
        return self.bytes if dtype == "quantized" else self.n_params * BYTES_PER_PARAM[dtype]

    @property
    def id(self) -> str:  # as a registry card names its model, for the planner
        return self.model_id


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
    kernel_path: str = "stock"  # exo.kernels' code path on this node: "avx512-vnni", "avx2", ... or "stock"
    kernel_reason: str = ""  # why that path: what was found, or why the native kernels are not used
    mode: NodeMode = NodeMode.NORMAL
    models: tuple[SharedModel, ...] = ()  # what it serves from its own files, for nodes that lack them

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


class InstanceKind(StrEnum):
    """How an instance's ring runs, as exo's upstream tags its instances."""

    CPU_RING = "CpuRingInstance"
    MLX_RING = "MlxRingInstance"  # MLX on a GPU on every node

    @classmethod
    def of(cls, profiles: Iterable[NodeProfile]) -> InstanceKind:
        devices = [p.mlx_device for p in profiles]  # str(mx.default_device()): "Device(gpu, 0)"
        return cls.MLX_RING if devices and all("gpu" in d for d in devices) else cls.CPU_RING


_KINDS = frozenset(InstanceKind)


class RunnerShard(FrozenModel):
    """One runner's part of an instance, as `shardAssignments.runnerToShard` shows it."""

    node_id: NodeId
    rank: Small
    world_size: Small
    start_layer: Small
    end_layer: Small
    n_layers: Small


class ShardAssignments(FrozenModel):
    model_id: str
    runner_to_shard: dict[str, RunnerShard]
    node_to_runner: dict[NodeId, str]


class Instance(FrozenModel):
    """A model placed on the cluster: one runner per shard, joined in a ring in rank order.

    Serialized tagged by its kind with its shard assignments derived, as exo's upstream shows it:
    `{"CpuRingInstance": {"instanceId", ..., "shardAssignments": {"modelId", "runnerToShard", "nodeToRunner"}}}`."""

    instance_id: InstanceId
    model_id: str
    n_layers: Small
    shards: tuple[ShardAssignment, ...]
    kind: InstanceKind = InstanceKind.CPU_RING
    context: Count | None = None  # positions (prompt and completion) a request may use; None: the model's own

    @property
    def node_ids(self) -> tuple[NodeId, ...]:
        return tuple(s.node_id for s in self.shards)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def shard_assignments(self) -> ShardAssignments:
        runners = {runner_id(self.instance_id, s.rank): s for s in self.shards}
        return ShardAssignments(
            model_id=self.model_id, node_to_runner={s.node_id: r for r, s in runners.items()},
            runner_to_shard={r: RunnerShard(node_id=s.node_id, rank=s.rank, world_size=len(self.shards),
                                            start_layer=s.start, end_layer=s.end, n_layers=self.n_layers)
                             for r, s in runners.items()})

    @model_validator(mode="wrap")
    @classmethod
    def _untag(cls, data: Any, handler: ModelWrapValidatorHandler[Instance]) -> Instance:
        if isinstance(data, dict) and len(data) == 1 and (kind := next(iter(data))) in _KINDS:
            body = data[kind]
            if isinstance(body, dict):
                data = {k: v for k, v in body.items() if k not in ("shardAssignments", "shard_assignments")}
                data["kind"] = kind
        return handler(data)

    @model_serializer(mode="wrap")
    def _tag(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        body = handler(self)
        if not info.by_alias:  # the wire (snake_case) carries only what the derived view is made from
            body.pop("shard_assignments", None)
        return {str(body.pop("kind")): body}


class State(FrozenModel):
    last_event_index: Index = -1
    term: Count = 0
    master_id: NodeId | None = None
    nodes: dict[NodeId, NodeProfile] = {}
    instances: dict[InstanceId, Instance] = {}
    runners: dict[str, RunnerInfo] = {}
    tasks: dict[str, TaskInfo] = {}  # the latest few, oldest first
