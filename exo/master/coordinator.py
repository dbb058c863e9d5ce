"""Membership, election and state replication of one node, as a pure message-driven state machine.

Every node runs a `Coordinator`. It is fed messages and clock ticks and answers with messages
to send; it never does I/O, so tests drive whole clusters through a simulated network and clock.

- Membership: every node heartbeats every peer it knows; a peer unheard for `peer_timeout` is gone.
- Election: with no live master, the greatest live heartbeat (most events applied, then node id)
  claims a new term, greater than any it has seen. A live master is kept (no churn when a better
  node joins). A master's own claim with a higher term wins; on equal terms the greater node id
  wins, so two masters that meet after a partition settle on one.
- Workers: each heartbeat carries the node's runners and latest tasks; the master turns any
  difference from the state into events, so statuses survive lost messages and new masters.
- Replication: only the master creates events. Followers apply them strictly in index order;
  a follower that is behind is sent the missing events, and one that holds another master's
  state (or none) is sent a snapshot. Messages of an older term are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exo.net.messages import EventBatch, Heartbeat, Leave, Snapshot
from exo.shared.apply import TASKS_KEPT, apply
from exo.shared.events import (
    BaseEvent,
    MasterElected,
    NodeJoined,
    NodeLeft,
    NodeProfileUpdated,
    RunnerRemoved,
    RunnerUpdated,
    TaskUpdated,
)
from exo.shared.runners import RunnerInfo, TaskInfo
from exo.shared.state import NodeProfile, State
from exo.shared.types import WIRE_INT_MAX, FrozenModel, NodeId

log = logging.getLogger(__name__)

LOG_KEPT = 1000  # events a master keeps to catch followers up without a snapshot


@dataclass(frozen=True)
class Outgoing:
    to: NodeId | None  # None: every peer this node knows
    message: FrozenModel


def compatible(ours: str, theirs: str) -> bool:
    """Nodes interoperate when their versions agree on major and minor."""
    return ours.split(".")[:2] == theirs.split(".")[:2]


class Coordinator:
    def __init__(self, profile: NodeProfile, *, cluster: str, term: int = 0, peer_timeout: float = 3.0,
                 on_term: Callable[[int], None] = lambda term: None) -> None:
        self.profile, self.cluster, self.peer_timeout = profile, cluster, peer_timeout
        self.term, self._on_term = term, on_term
        self.master_id: NodeId | None = None
        self.synced_term = -1
        self.state = State()
        self.log: list[BaseEvent] = []
        self.peers: dict[NodeId, tuple[float, Heartbeat]] = {}
        self.runners: tuple[RunnerInfo, ...] = ()
        self.tasks: tuple[TaskInfo, ...] = ()
        self.queues: dict[str, int] = {}
        self.dropped = 0  # peers dropped for silence since this node started
        self._left: dict[NodeId, float] = {}  # peers that said they leave, and when: their late heartbeats are stale
        self._started: float | None = None

    @property
    def node_id(self) -> NodeId:
        return self.profile.node_id

    @property
    def is_master(self) -> bool:
        return self.master_id == self.node_id

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(cluster=self.cluster, version=self.profile.version, profile=self.profile, term=self.term,
                         master_id=self.master_id, synced_term=self.synced_term,
                         last_event_index=self.state.last_event_index, runners=self.runners, tasks=self.tasks,
                         queues=self.queues)

    def leave(self) -> list[Outgoing]:
        """This node is stopping: tell every peer, so they drop it now."""
        return [Outgoing(None, Leave(cluster=self.cluster, node_id=self.node_id, term=self.term))]

    def update_profile(self, profile: NodeProfile) -> None:
        self.profile = profile

    def update_worker(self, runners: tuple[RunnerInfo, ...], tasks: tuple[TaskInfo, ...]) -> None:
        self.runners, self.tasks = runners, tasks

    # -- inputs ---------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Outgoing]:
        """Expire silent peers, elect if there is no master, reconcile membership, heartbeat."""
        if self._started is None:
            self._started = now
        for node_id in [n for n, (seen, _) in self.peers.items() if now - seen > self.peer_timeout]:
            log.info("node=%s peer=%s silent for %.1fs: dropped", self.node_id, node_id, self.peer_timeout)
            del self.peers[node_id]
            self.dropped += 1
        if self.master_id is not None and not self.is_master and self.master_id not in self.peers:
            log.info("node=%s master %s is gone (term %d)", self.node_id, self.master_id, self.term)
            self.master_id = None
        out: list[Outgoing] = []
        # A node just started listens for half a timeout before it may claim, to hear a live master.
        settled = now - self._started >= self.peer_timeout / 2
        if self.master_id is None and settled and max(self._live_heartbeats()).node_id == self.node_id:
            out += self._claim()
        if self.is_master:
            out += self._reconcile_membership()
            out += self._reconcile_workers()
        return [*out, Outgoing(None, self.heartbeat())]

    def receive(self, message: Any, now: float) -> list[Outgoing]:
        match message:
            case Heartbeat():
                return self._on_heartbeat(message, now)
            case Leave():
                self._on_leave(message, now)
            case EventBatch():
                self._on_events(message)
            case Snapshot():
                self._on_snapshot(message)
        return []

    def emit(self, *events: Callable[[int, int], BaseEvent]) -> list[Outgoing]:
        """As master, append events (each built from its index and term) and send them to followers."""
        if not self.is_master:
            raise RuntimeError("only the master creates events")
        made = []
        for make in events:
            event = make(self.state.last_event_index + 1, self.term)
            self.state = apply(self.state, event)
            made.append(event)
        self.log = (self.log + made)[-LOG_KEPT:]
        return [Outgoing(None, EventBatch(term=self.term, master_id=self.node_id, events=made))] if made else []

    # -- election -------------------------------------------------------------------------------

    def _live_heartbeats(self) -> list[Heartbeat]:
        return [self.heartbeat(), *(hb for _, hb in self.peers.values())]

    def _claim(self) -> list[Outgoing]:
        # Terms off the wire are at most WIRE_INT_MAX; at the ceiling, equal terms settle by node id.
        term = min(max(hb.term for hb in self._live_heartbeats()) + 1, WIRE_INT_MAX)
        log.info("node=%s becomes master for term %d", self.node_id, term)
        self._set_term(term)
        self.master_id, self.synced_term, self.log = self.node_id, term, []
        return self.emit(lambda i, t: MasterElected(index=i, term=t, node_id=self.node_id))

    def _adopt(self, term: int, master_id: NodeId) -> None:
        if self.is_master:
            log.info("node=%s steps down: %s is master for term %d", self.node_id, master_id, term)
        else:
            log.info("node=%s follows %s in term %d", self.node_id, master_id, term)
        self._set_term(term)
        self.master_id, self.synced_term = master_id, -1  # the new master's snapshot replaces our state

    def _set_term(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self._on_term(term)

    def _on_leave(self, leave: Leave, now: float) -> None:
        if leave.cluster != self.cluster or leave.node_id not in self.peers:
            return
        log.info("node=%s peer=%s left the cluster", self.node_id, leave.node_id)
        del self.peers[leave.node_id]
        self._left[leave.node_id] = now
        if self.master_id == leave.node_id:
            self.master_id = None  # elect at the next tick, without waiting for a timeout

    def _on_heartbeat(self, hb: Heartbeat, now: float) -> list[Outgoing]:
        if hb.cluster != self.cluster or not compatible(self.profile.version, hb.version) or hb.node_id == self.node_id:
            return []
        if (left := self._left.get(hb.node_id)) is not None:
            if now - left < self.peer_timeout:
                return []  # sent before its Leave, arrived after it
            del self._left[hb.node_id]
        self.peers[hb.node_id] = (now, hb)
        if hb.node_id == self.master_id and hb.master_id is None and hb.term >= self.term:
            self.master_id = None  # our master restarted (its term persisted, its mastership not): elect anew
        claims = hb.master_id == hb.node_id
        if claims and (hb.term > self.term or (hb.term == self.term and hb.node_id != self.master_id
                                               and (self.master_id is None or hb.node_id > self.master_id))):
            self._adopt(hb.term, hb.node_id)
        if not self.is_master:
            return []
        if hb.term > self.term and hb.master_id is None:  # a peer remembers a later term: claim past it
            return self._claim()
        return self._catch_up(hb)

    def _catch_up(self, hb: Heartbeat) -> list[Outgoing]:
        if hb.synced_term == self.term and hb.last_event_index >= self.state.last_event_index:
            return []
        missing = [e for e in self.log if e.index > hb.last_event_index]
        if hb.synced_term == self.term and missing and missing[0].index == hb.last_event_index + 1:
            return [Outgoing(hb.node_id, EventBatch(term=self.term, master_id=self.node_id, events=missing))]
        return [Outgoing(hb.node_id, Snapshot(term=self.term, master_id=self.node_id, state=self.state))]

    # -- replication ----------------------------------------------------------------------------

    def _from_current_master(self, term: int, master_id: NodeId) -> bool:
        if term > self.term and master_id in self.peers:  # a heartbeat vouched for its cluster and version
            self._adopt(term, master_id)
        return term == self.term and master_id == self.master_id and not self.is_master

    def _on_events(self, batch: EventBatch) -> None:
        if not self._from_current_master(batch.term, batch.master_id) or self.synced_term != batch.term:
            return
        for event in batch.events:
            if event.index == self.state.last_event_index + 1:
                self.state = apply(self.state, event)
            elif event.index > self.state.last_event_index + 1:
                break  # a gap: the master resends from our next heartbeat

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        if not self._from_current_master(snapshot.term, snapshot.master_id):
            return
        if snapshot.term == self.synced_term and snapshot.state.last_event_index < self.state.last_event_index:
            return  # a late copy of an older snapshot: taking it would rewind the state
        self.state, self.synced_term = snapshot.state, snapshot.term

    # -- membership -----------------------------------------------------------------------------

    def _reconcile_membership(self) -> list[Outgoing]:
        alive = {self.node_id: self.profile, **{n: hb.profile for n, (_, hb) in self.peers.items()}}
        known = self.state.nodes
        events: list[Callable[[int, int], BaseEvent]] = []
        for node_id, profile in alive.items():
            if node_id not in known:
                events.append(lambda i, t, p=profile: NodeJoined(index=i, term=t, profile=p))
            elif _changed(known[node_id], profile):
                events.append(lambda i, t, p=profile: NodeProfileUpdated(index=i, term=t, profile=p))
        for node_id in known.keys() - alive.keys():
            events.append(lambda i, t, n=node_id: NodeLeft(index=i, term=t, node_id=n))
        return self.emit(*events)


    def _reconcile_workers(self) -> list[Outgoing]:
        state = self.state
        alive = self._live_heartbeats()
        reported = {r.runner_id: r for hb in alive for r in hb.runners if r.instance_id in state.instances}
        events: list[Callable[[int, int], BaseEvent]] = []
        for runner_id, runner in reported.items():
            if state.runners.get(runner_id) != runner:
                events.append(lambda i, t, r=runner: RunnerUpdated(index=i, term=t, runner=r))
        nodes = {hb.node_id for hb in alive}
        for runner_id, runner in state.runners.items():
            if runner.node_id in nodes and runner_id not in reported:
                events.append(lambda i, t, r=runner_id: RunnerRemoved(index=i, term=t, runner_id=r))
        # only as many as the state keeps, or the ones it drops would come back on every tick
        tasks = [t for hb in alive for t in hb.tasks if t.instance_id in state.instances][-TASKS_KEPT:]
        for task in tasks:
            if state.tasks.get(task.task_id) != task:
                events.append(lambda i, t, k=task: TaskUpdated(index=i, term=t, task=k))
        return self.emit(*events)


def _changed(old: NodeProfile, new: NodeProfile) -> bool:
    """A profile worth an event: anything but available memory changed, or that moved by over 5%."""
    if old.model_copy(update={"memory_available": 0}) != new.model_copy(update={"memory_available": 0}):
        return True
    return abs(old.memory_available - new.memory_available) > 0.05 * max(new.memory_total, 1)
