"""Which instances must move: a pure function of the cluster state, applied by the master each tick.

An instance moves when it cannot serve where it is and waiting will not help: a node of it left the
cluster, or a runner of it failed past its restarts. An instance on a draining node (maintenance,
or a node that is stopping) moves once it is idle, so the requests it is serving finish first.
Moving is deleting it and placing the model anew on the nodes that take work.
"""

from __future__ import annotations

from collections.abc import Mapping

from exo.shared.runners import RunnerStatus, runner_id
from exo.shared.state import Instance, NodeMode, NodeProfile, State
from exo.shared.types import NodeId


def instances_to_move(state: State, queues: Mapping[str, int]) -> list[tuple[Instance, str]]:
    """Each instance to move, with the reason; `queues` holds the requests in flight per instance."""
    moves = []
    for instance in state.instances.values():
        if reason := _why_move(state, instance, queues.get(instance.instance_id, 0)):
            moves.append((instance, reason))
    return moves


def eligible_nodes(state: State) -> list[NodeProfile]:
    """The nodes a new placement may use."""
    return [node for node in state.nodes.values() if node.mode == NodeMode.NORMAL]


def draining_nodes(state: State, instance: Instance) -> list[NodeId]:
    """The nodes of `instance` that take no new work."""
    return [n for n in instance.node_ids if n in state.nodes and state.nodes[n].mode == NodeMode.DRAIN]


def _why_move(state: State, instance: Instance, in_flight: int) -> str | None:
    if gone := [n for n in instance.node_ids if n not in state.nodes]:
        return f"node {gone[0]} left the cluster"
    runners = [state.runners.get(runner_id(instance.instance_id, s.rank)) for s in instance.shards]
    if failed := [r for r in runners if r is not None and r.gave_up]:
        return f"runner {failed[0].runner_id} failed {failed[0].restarts + 1} times ({failed[0].error})"
    if draining := draining_nodes(state, instance):
        busy = in_flight or any(r is not None and r.status == RunnerStatus.RUNNING for r in runners)
        if not busy:
            return f"node {draining[0]} is draining"
    return None
