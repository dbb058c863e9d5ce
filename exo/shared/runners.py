"""Runners and their tasks as the cluster state shows them: statuses, and one record of each."""

from __future__ import annotations

import uuid
from enum import StrEnum

from exo.shared.types import Count, FrozenModel, InstanceId, NodeId, RingPort, Small


class RunnerStatus(StrEnum):
    IDLE = "Idle"
    CONNECTING = "Connecting"
    CONNECTED = "Connected"
    LOADING = "Loading"
    LOADED = "Loaded"
    WARMING_UP = "WarmingUp"
    READY = "Ready"
    RUNNING = "Running"
    SHUTTING_DOWN = "ShuttingDown"
    SHUTDOWN = "Shutdown"
    FAILED = "Failed"


class TaskKind(StrEnum):
    CONNECT = "Connect"
    LOAD = "Load"
    WARMUP = "Warmup"
    CHAT = "Chat"
    SHUTDOWN = "Shutdown"


class TaskStatus(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    COMPLETE = "Complete"
    FAILED = "Failed"
    CANCELLED = "Cancelled"  # its client went away, or its runner was stopped, before it finished


SERVING = (RunnerStatus.READY, RunnerStatus.RUNNING)  # a runner that takes requests


def new_task_id() -> str:
    return uuid.uuid4().hex[:12]


def runner_id(instance_id: InstanceId, rank: int) -> str:
    return f"{instance_id}.{rank}"


class Download(FrozenModel):
    """A runner's model, coming from a node that has its files (exo/models/peers.py)."""

    from_node: NodeId
    bytes_done: Count
    bytes_total: Count  # what its layer range reads


class RunnerInfo(FrozenModel):
    """One runner process: its rank and layers `[start, end)` in its instance, where its ring
    listens, and how it is."""

    instance_id: InstanceId
    rank: Small
    node_id: NodeId
    start: Small
    end: Small
    status: RunnerStatus
    host: str
    port: RingPort
    pid: Count | None = None
    error: str | None = None
    restarts: Count = 0       # times its node's watchdog restarted it
    gave_up: bool = False   # failed past its restarts: only a new placement can bring the instance back
    download: Download | None = None  # its layers' bytes, fetched from a peer before it loads them
    batch: Count = 0  # chats it decodes together now (rank 0 of an instance of one rank batches them)

    @property
    def runner_id(self) -> str:
        return runner_id(self.instance_id, self.rank)


class TaskInfo(FrozenModel):
    task_id: str
    instance_id: InstanceId
    rank: Small
    kind: TaskKind
    status: TaskStatus
    error: str | None = None
