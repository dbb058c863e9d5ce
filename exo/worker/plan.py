"""What this node's worker should do next about its runners: a pure function of what it sees.

`plan(node_id, state, local)` compares the instances the cluster state assigns to this node with
the runners it has, and answers with actions: start a runner, stop one, or give one its next
lifecycle task. A runner busy with a lifecycle task gets nothing more until it reports back,
but one whose instance is gone is stopped whatever it is doing.

A ring is formed once: when a rank of it starts again (on a new port), the others' ring is dead
even if they have not noticed, so they restart too, and all join the new ring together.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from exo.shared.runners import RunnerStatus, TaskKind, runner_id
from exo.shared.state import Instance, ShardAssignment, State
from exo.shared.types import NodeId


@dataclass(frozen=True)
class LocalRunner:
    status: RunnerStatus
    busy: bool  # a lifecycle task is in flight, or the runner is stopping
    hosts: tuple[str, ...] | None = None  # the ring it joined, or is joining


@dataclass(frozen=True)
class Spawn:
    instance: Instance
    shard: ShardAssignment


@dataclass(frozen=True)
class Stop:
    runner_id: str


@dataclass(frozen=True)
class Restart:
    runner_id: str


@dataclass(frozen=True)
class Send:
    runner_id: str
    kind: TaskKind
    hosts: tuple[str, ...] = ()


Action = Spawn | Stop | Restart | Send


def plan(node_id: NodeId, state: State, local: Mapping[str, LocalRunner]) -> list[Action]:
    assigned = {runner_id(i.instance_id, s.rank): (i, s) for i in state.instances.values()
                for s in i.shards if s.node_id == node_id}
    actions: list[Action] = [Stop(r) for r in sorted(local.keys() - assigned.keys())]
    for rid, (instance, shard) in assigned.items():
        runner = local.get(rid)
        if runner is None:
            actions.append(Spawn(instance, shard))
        elif runner.hosts is not None and _ring_changed(runner.hosts, instance, state):
            if not runner.busy or runner.status == RunnerStatus.CONNECTING:
                actions.append(Restart(rid))
        elif not runner.busy and (task := _next_task(rid, runner.status, instance, state)) is not None:
            actions.append(task)
    return actions


def _next_task(rid: str, status: RunnerStatus, instance: Instance, state: State) -> Send | None:
    match status:
        case RunnerStatus.IDLE if len(instance.shards) == 1:
            return Send(rid, TaskKind.LOAD)
        case RunnerStatus.IDLE:
            hosts = ring_hosts(instance, state, fresh=True)
            return None if hosts is None else Send(rid, TaskKind.CONNECT, hosts)
        case RunnerStatus.CONNECTED:
            return Send(rid, TaskKind.LOAD)
        case RunnerStatus.LOADED:
            return Send(rid, TaskKind.WARMUP)
    return None


def ring_hosts(instance: Instance, state: State, *, fresh: bool = False) -> tuple[str, ...] | None:
    """Every rank's ring address in rank order, once every runner of the instance has reported one
    (and, if `fresh`, none of them has joined an earlier ring)."""
    runners = [state.runners.get(runner_id(instance.instance_id, s.rank)) for s in instance.shards]
    if any(r is None or (fresh and r.status not in _JOINING) for r in runners):
        return None
    return tuple(f"{r.host}:{r.port}" for r in runners if r is not None)


_JOINING = (RunnerStatus.IDLE, RunnerStatus.CONNECTING)


def _ring_changed(joined: tuple[str, ...], instance: Instance, state: State) -> bool:
    """A rank of the ring this runner joined now listens elsewhere: it was started again."""
    current = ring_hosts(instance, state)
    return current is not None and current != joined
