"""A simulated network and clock for driving a cluster of Coordinators without sockets or sleeps.

`step()` advances the clock, ticks every live node and delivers what they send, breadth first,
until the network is quiet. Every frame goes through the wire codec. Partitions, killed nodes and
a seeded `random.Random` that drops, duplicates, reorders and delays frames make the faults.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from exo.master.coordinator import Coordinator, Outgoing
from exo.net.messages import CODEC
from exo.shared.events import BaseEvent
from exo.shared.state import NodeProfile
from exo.shared.types import NodeId

MAX_WAVES = 50  # a coordinator answers each message at most once, so a storm this deep is a bug


def profile(node_id: str, *, version: str = "0.1.0") -> NodeProfile:
    return NodeProfile(node_id=NodeId(node_id), hostname=node_id, version=version, address="10.0.0.1",
                       api_port=52415, memory_total=16 << 30, memory_available=8 << 30, cpu_count=8,
                       accelerator="cpu", mlx_device="cpu")


@dataclass(frozen=True)
class Frame:
    src: NodeId
    dst: NodeId
    data: bytes


@dataclass(repr=False)
class SimNet:
    seed: int = 0
    drop: float = 0.0  # probability a frame is lost
    duplicate: float = 0.0  # probability a frame arrives twice
    delay: float = 0.0  # probability a frame arrives only in the next step
    reorder: bool = False  # shuffle each wave of deliveries
    peer_timeout: float = 3.0
    now: float = 0.0
    nodes: dict[NodeId, Coordinator] = field(default_factory=dict)
    killed: set[NodeId] = field(default_factory=set)
    groups: list[set[NodeId]] | None = None  # None: everyone can talk to everyone
    persisted: dict[NodeId, int] = field(default_factory=dict)  # each node's term as saved through on_term
    term_history: dict[NodeId, list[int]] = field(default_factory=dict)  # each node's term after every step
    rewinds: list[str] = field(default_factory=list)  # a node's state went back within one master's term

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._later: list[Frame] = []
        self._pending: list[tuple[NodeId, Outgoing]] = []
        self._last_seen: dict[NodeId, tuple[Coordinator, int, int]] = {}

    # -- membership and faults ----------------------------------------------------------------

    def add(self, node_id: str, *, cluster: str = "exo", version: str = "0.1.0",
            term: int | None = None) -> Coordinator:
        """Start a node; without `term` it starts from the term it persisted before (0 if none)."""
        nid = NodeId(node_id)
        start = self.persisted.get(nid, 0) if term is None else term
        self.persisted[nid] = start

        def persist(new: int) -> None:
            self.persisted[nid] = new

        self.nodes[nid] = Coordinator(profile(node_id, version=version), cluster=cluster, term=start,
                                      peer_timeout=self.peer_timeout, on_term=persist)
        self.killed.discard(nid)
        return self.nodes[nid]

    def kill(self, node_id: str) -> None:
        self.killed.add(NodeId(node_id))

    def leave(self, node_id: str) -> None:
        """The node stops cleanly: its goodbye goes out with the next step, and then it is gone."""
        self._pending += [(NodeId(node_id), o) for o in self.nodes[NodeId(node_id)].leave()]
        self.step(0.1)
        self.kill(node_id)

    def restart(self, node_id: str) -> Coordinator:
        """A fresh process for `node_id`: empty state, the persisted term."""
        return self.add(node_id, cluster=self.nodes[NodeId(node_id)].cluster,
                        version=self.nodes[NodeId(node_id)].profile.version)

    def partition(self, *groups: set[str]) -> None:
        self.groups = [{NodeId(n) for n in g} for g in groups]

    def heal(self) -> None:
        self.groups = None

    def can_talk(self, a: NodeId, b: NodeId) -> bool:
        return self.groups is None or any(a in g and b in g for g in self.groups)

    @property
    def live(self) -> dict[NodeId, Coordinator]:
        return {n: c for n, c in self.nodes.items() if n not in self.killed}

    # -- driving ------------------------------------------------------------------------------

    def emit(self, node_id: str, *events: Callable[[int, int], BaseEvent]) -> None:
        """Have the master `node_id` create events; they go out with the next step."""
        self._pending += [(NodeId(node_id), o) for o in self.nodes[NodeId(node_id)].emit(*events)]

    def step(self, dt: float = 0.5) -> None:
        self.now += dt
        wave = [f for f in self._later if f.dst not in self.killed]
        self._later = []
        outgoing, self._pending = self._pending, []
        for node_id, node in self.live.items():
            outgoing += [(node_id, o) for o in node.tick(self.now)]
        wave += self._frames(outgoing)
        for _ in range(MAX_WAVES):
            if not wave:
                break
            if self.reorder:
                self.rng.shuffle(wave)
            answers: list[tuple[NodeId, Outgoing]] = []
            for frame in wave:
                if frame.dst in self.killed:
                    continue
                answers += [(frame.dst, o) for o in self.nodes[frame.dst].receive(CODEC.decode(frame.data), self.now)]
                self._watch(frame.dst)
            wave = self._frames(answers)
        else:
            raise AssertionError(f"messages still flowing after {MAX_WAVES} waves")
        for node_id, node in self.nodes.items():
            self.term_history.setdefault(node_id, []).append(node.term)

    def _watch(self, node_id: NodeId) -> None:
        """Note a node whose state went back to an earlier index of the same master's term."""
        node = self.nodes[node_id]
        seen = (node, node.synced_term, node.state.last_event_index)
        if (last := self._last_seen.get(node_id)) and last[:2] == seen[:2] and seen[2] < last[2]:
            self.rewinds.append(f"t={self.now:.1f} {node_id} term {node.synced_term}: {last[2]} -> {seen[2]}")
        self._last_seen[node_id] = seen

    def _frames(self, outgoing: list[tuple[NodeId, Outgoing]]) -> list[Frame]:
        frames, live = [], self.live
        for src, out in outgoing:
            data = CODEC.encode(out.message)
            targets = [n for n in live if n != src] if out.to is None else [out.to]
            for dst in targets:
                if dst not in live or not self.can_talk(src, dst) or self.rng.random() < self.drop:
                    continue
                copies = 2 if self.rng.random() < self.duplicate else 1
                for _ in range(copies):
                    (self._later if self.rng.random() < self.delay else frames).append(Frame(src, dst, data))
        return frames

    def run(self, seconds: float, dt: float = 0.5) -> None:
        for _ in range(round(seconds / dt)):
            self.step(dt)

    def run_until(self, predicate: Callable[[], bool], *, seconds: float, dt: float = 0.5) -> float | None:
        """Step until `predicate()` holds; the simulated seconds it took, or None if it never did."""
        start = self.now
        for _ in range(round(seconds / dt)):
            self.step(dt)
            if predicate():
                return self.now - start
        return None

    # -- what the cluster looks like ----------------------------------------------------------

    def masters(self, among: set[NodeId] | None = None) -> set[NodeId]:
        return {n for n, c in self.live.items() if c.is_master and (among is None or n in among)}

    def settled(self, among: set[str] | None = None) -> bool:
        """Exactly one master, followed by every node in `among` (default: all live), all in sync."""
        ids = {NodeId(n) for n in among} if among is not None else set(self.live)
        nodes = [self.nodes[n] for n in ids]
        master = nodes[0].master_id
        return (len(self.masters(ids)) == 1 and all(c.master_id == master and c.term == nodes[0].term
                                                      and c.synced_term == c.term for c in nodes)
                and all(c.state == nodes[0].state for c in nodes))

    def __repr__(self) -> str:
        return f"SimNet(now={self.now}, nodes={sorted(self.nodes)}, killed={sorted(self.killed)})"

    def describe(self) -> str:
        return "\n".join(f"t={self.now:.1f} {n}{' (dead)' if n in self.killed else ''}: master={c.master_id} "
                         f"term={c.term} synced={c.synced_term} index={c.state.last_event_index} "
                         f"nodes={sorted(c.state.nodes)}" for n, c in sorted(self.nodes.items()))
