"""What nodes say to each other, and the codec that carries it."""

from __future__ import annotations

from exo.net.codec import Codec
from exo.shared.events import EVENT_TYPES, Event
from exo.shared.runners import RunnerInfo, TaskInfo
from exo.shared.state import NodeProfile, State
from exo.shared.types import Count, FrozenModel, Index, NodeId


class Heartbeat(FrozenModel):
    """Sent by every node to every peer it knows, every heartbeat interval.

    Its order is the election order: among live nodes with no master, the greatest heartbeat's
    node becomes master: the one holding the latest master's state, and of those the one with the
    most of its events, so a new master never loses committed events.
    """

    cluster: str
    version: str
    profile: NodeProfile
    term: Count
    master_id: NodeId | None
    synced_term: Index  # the term whose master's state this node holds; -1 while it holds none
    last_event_index: Index
    runners: tuple[RunnerInfo, ...] = ()  # this node's runners and latest tasks, as its worker sees them
    tasks: tuple[TaskInfo, ...] = ()
    queues: dict[str, Count] = {}  # requests waiting or running per instance whose rank 0 is here

    @property
    def node_id(self) -> NodeId:
        return self.profile.node_id

    def _key(self) -> tuple[int, int, str]:
        return self.synced_term, self.last_event_index, self.node_id

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Heartbeat):
            return NotImplemented
        return self._key() < other._key()


class Leave(FrozenModel):
    """Sent by a node that is stopping, once its work is done, so its peers drop it at once
    (and re-plan what ran on it) instead of waiting for its heartbeats to time out."""

    cluster: str
    node_id: NodeId
    term: Count


class EventBatch(FrozenModel):
    """Events from the master of `term`, in index order."""

    term: Count
    master_id: NodeId
    events: list[Event]


class Snapshot(FrozenModel):
    """The master's whole state, for a follower that is new, far behind, or followed another master."""

    term: Count
    master_id: NodeId
    state: State


CODEC = Codec(Heartbeat, Leave, EventBatch, Snapshot, *EVENT_TYPES)
