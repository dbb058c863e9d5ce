"""Runs this node's Coordinator: ticks it, feeds it peers' messages, sends what it answers."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from exo.master.coordinator import Coordinator, Outgoing
from exo.master.planner import DEFAULT_CONTEXT, Placeable, committed_bytes, instance_bytes, place
from exo.master.replan import eligible_nodes, instances_to_move
from exo.models.cards import CARDS, ModelCard
from exo.net.auth import AuthError, Proof, Throttle
from exo.net.messages import CODEC, EventBatch, Heartbeat, Leave, Snapshot
from exo.net.transport import PeerTransport
from exo.shared.errors import PlacementRefused, ServiceUnavailable
from exo.shared.events import InstanceCreated, InstanceDeleted
from exo.shared.runners import RunnerInfo, TaskInfo
from exo.shared.state import Instance, InstanceKind, NodeMode, NodeProfile, SharedModel, State
from exo.shared.types import CacheDtype, Dtype, FrozenModel, InstanceId, NodeId, new_instance_id

log = logging.getLogger(__name__)

PROFILE_REFRESH_SECONDS = 5.0


class ClusterService:
    def __init__(self, coordinator: Coordinator, transport: PeerTransport, *, measure: Callable[[], NodeProfile],
                 heartbeat_interval: float = 0.5, dtype: Dtype = "quantized", kv_cache: CacheDtype | None = None,
                 context: int = DEFAULT_CONTEXT, on_state: Callable[[State], None] = lambda state: None,
                 queues: Callable[[], dict[str, int]] = dict,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.coordinator, self.transport, self.measure, self.on_state = coordinator, transport, measure, on_state
        self.heartbeat_interval, self.dtype, self.queues, self.clock = heartbeat_interval, dtype, queues, clock
        self.kv_cache, self.context = kv_cache, context  # how instances placed here are sized
        self.mode = NodeMode.NORMAL
        self._outbox_in, self._outbox = anyio.create_memory_object_stream[Outgoing](max_buffer_size=1024)
        self._worker_changed = anyio.Event()
        self._published: State | None = None
        self._sending = 0  # messages taken from the outbox and not yet delivered (or given up)
        self._bug = Throttle(60.0)  # one traceback a minute per place, should a bug recur every tick

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._send_loop)
            task_status.started()
            last_profile = self.clock()
            while True:
                if self.clock() - last_profile >= PROFILE_REFRESH_SECONDS:
                    self._refresh_profile()
                    last_profile = self.clock()
                self.coordinator.queues = self.queues()
                try:
                    self._post(self.coordinator.tick(self.clock()))
                    self.transport.keep_only(self.coordinator.peers)  # peers timed out or gone: not sent to
                    if self.coordinator.is_master:
                        self._replan()
                except Exception:  # a bug, maybe fed by a peer's message: the node keeps running
                    if self._bug("tick"):
                        log.exception("node=%s coordinator tick failed", self.coordinator.node_id)
                with anyio.move_on_after(self.heartbeat_interval):
                    await self._worker_changed.wait()
                self._worker_changed = anyio.Event()

    def report_worker(self, runners: tuple[RunnerInfo, ...], tasks: tuple[TaskInfo, ...]) -> None:
        """This node's runners changed: heartbeat now rather than at the next interval (reports that
        come together go out in one heartbeat)."""
        self.coordinator.update_worker(runners, tasks)
        self._worker_changed.set()

    def set_mode(self, mode: NodeMode) -> None:
        """Drain this node (no new work; its instances move once idle) or bring it back."""
        if mode != self.mode:
            log.info("node=%s mode %s -> %s", self.coordinator.node_id, self.mode, mode)
            self.mode = mode
            self._refresh_profile()
            self._worker_changed.set()  # tell the cluster now

    def all_queues(self) -> dict[str, int]:
        """Requests in flight per instance, as the nodes where they wait last said."""
        queues = dict(self.coordinator.queues)
        for _, hb in self.coordinator.peers.values():
            queues.update(hb.queues)
        return queues

    async def leave(self, timeout: float) -> None:
        """Say goodbye to every peer, then close the outbox once what is in it is delivered (or
        `timeout` passes): nothing is sent on a closed channel, and the peers re-plan at once."""
        with anyio.move_on_after(timeout) as scope:
            await self._drained()  # what is queued first: a goodbye must not overtake a master's last events
            self._post(self.coordinator.leave())
            self._outbox_in.close()
            await self._drained()
        self._outbox_in.close()
        if scope.cancelled_caught:
            log.warning("node=%s left with %d messages undelivered after %.1fs", self.coordinator.node_id,
                        self._sending, timeout)

    async def _drained(self) -> None:
        while self._sending or self._outbox.statistics().current_buffer_used:
            await anyio.sleep(0.01)

    def receive(self, frame: bytes, sender_host: str, proof: Proof | None = None) -> None:
        """Handle one frame from a peer (`proof`: its verified proof, where the cluster has a secret).
        Raises WireError for a frame that is not a valid message, AuthError for one its proof's sender
        did not write."""
        message = CODEC.decode(frame)
        if proof is not None and (sender := _sender(message)) is not None and sender != proof.sender:
            raise AuthError(f"node {proof.sender} sent a message of node {sender}")
        if isinstance(message, Heartbeat):
            self.transport.learn(message.node_id, sender_host, message.profile.api_port,
                                 addressed=proof is None or proof.addressed)
        try:
            self._post(self.coordinator.receive(message, self.clock()))
        except Exception:  # a bug a peer's message ran into: dropped, and the node keeps running
            if self._bug(f"receive {type(message).__name__}"):
                log.exception("node=%s dropped a %s it failed to handle", self.coordinator.node_id,
                              type(message).__name__)

    # -- master commands (the API forwards them to the master) -----------------------------------

    def place_instance(self, card: ModelCard | SharedModel, *, min_nodes: int = 1,
                       context: int | None = None) -> Instance:
        """Place `card`, serving `context` positions (see `served_context`), where the planner says; a
        node's own model first on the nodes that have its files (nothing to fetch), and only where those
        cannot hold it on others, which fetch their layers."""
        self._require_master()
        state = self.coordinator.state
        committed, loading = committed_bytes(state, self.placed_bytes)
        nodes = eligible_nodes(state)
        holders = [n for n in nodes if any(m.model_id == card.id for m in n.models)]
        context = self.served_context(card, context)
        if isinstance(card, SharedModel) and holders:
            with contextlib.suppress(PlacementRefused):
                return self._place(card, context, holders, min_nodes, committed, loading)
        return self._place(card, context, nodes, min_nodes, committed, loading)

    def _place(self, card: ModelCard | SharedModel, context: int, nodes: list[NodeProfile], min_nodes: int,
               committed: dict[NodeId, int], loading: dict[NodeId, int]) -> Instance:
        shards = place(card, nodes, model_bytes=self.instance_bytes(card, context), min_nodes=min_nodes,
                       committed=committed, loading=loading, context=context)
        return self.add_instance(Instance(instance_id=new_instance_id(), model_id=card.id,
                                          n_layers=card.n_layers, shards=shards, context=context))

    def placeable(self, model_id: str) -> ModelCard | SharedModel | None:
        """What the planner knows of `model_id`: its registry card, or what a node serving it from its own
        files advertises."""
        if (card := CARDS.get(model_id)) is not None:
            return card
        return next((m for node in self.coordinator.state.nodes.values() for m in node.models
                     if m.model_id == model_id), None)

    def served_context(self, model: Placeable, asked: int | None = None) -> int:
        """Positions (prompt and completion) an instance of `model` serves: `asked`, else --context, within
        what the model was trained for."""
        return min(asked or self.context, model.context_length)

    def instance_bytes(self, model: Placeable, context: int) -> int:
        """What an instance of `model` serving `context` positions takes here, weights and caches."""
        return instance_bytes(model, context, self.dtype, self.kv_cache)

    def placed_bytes(self, instance: Instance) -> int | None:
        """What an instance placed takes, if the registry or a node serving its model knows the model."""
        if (card := self.placeable(instance.model_id)) is None:
            return None
        return self.instance_bytes(card, instance.context or self.served_context(card))

    def add_instance(self, instance: Instance) -> Instance:
        self._require_master()
        nodes = self.coordinator.state.nodes
        kind = InstanceKind.of(nodes[n] for n in instance.node_ids if n in nodes)
        instance = instance.model_copy(update={"kind": kind})  # recorded, so every node reports the same
        self._post(self.coordinator.emit(lambda i, t: InstanceCreated(index=i, term=t, instance=instance)))
        log.info("instance=%s model=%s placed on %s", instance.instance_id, instance.model_id,
                 ", ".join(f"{s.node_id}[{s.start}:{s.end})" for s in instance.shards))
        return instance

    def delete_instance(self, instance_id: InstanceId) -> None:
        self._require_master()
        self._post(self.coordinator.emit(lambda i, t: InstanceDeleted(index=i, term=t, instance_id=instance_id)))

    def _replan(self) -> None:
        """Move the instances that cannot serve where they are: delete each, and place its model
        again on the nodes that take work (a model that no longer fits is placed by its next request,
        which then says what is missing)."""
        for instance, reason in instances_to_move(self.coordinator.state, self.all_queues()):
            log.warning("instance=%s model=%s %s: placing it again", instance.instance_id, instance.model_id, reason)
            self.delete_instance(instance.instance_id)
            if (card := self.placeable(instance.model_id)) is None:
                log.warning("instance=%s model=%s is neither in the registry nor served by a node from its files: "
                            "place it again by hand", instance.instance_id, instance.model_id)
                continue
            nodes = eligible_nodes(self.coordinator.state)
            if not nodes:
                log.warning("model=%s not placed again: every node is draining", instance.model_id)
                continue
            try:
                self.place_instance(card, min_nodes=max(1, min(len(instance.shards), len(nodes))),
                                    context=instance.context)
            except PlacementRefused as e:
                log.error("model=%s could not be placed again: %s", instance.model_id, e.message)

    def _refresh_profile(self) -> None:
        self.coordinator.update_profile(self.measure().model_copy(update={"mode": self.mode}))

    def master_url(self) -> str:
        """Where to forward master commands; raises ServiceUnavailable while there is no master."""
        master = self.coordinator.master_id
        if master is not None and (url := self.transport.url(master)):
            return url
        raise ServiceUnavailable("The cluster has no master yet (an election is under way); retry in a few seconds.")

    def _require_master(self) -> None:
        if not self.coordinator.is_master:
            raise ServiceUnavailable("This node is not the master; send the request to any node's API.")

    def _post(self, outgoing: list[Outgoing]) -> None:
        if self.coordinator.state is not self._published:
            self._published = self.coordinator.state
            self.on_state(self._published)
        for item in outgoing:
            try:
                self._outbox_in.send_nowait(item)
            except anyio.WouldBlock:
                log.warning("outbox full: dropped a %s (heartbeats will retry)", type(item.message).__name__)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return  # the node is stopping: its peers will notice by its silence

    async def _send_loop(self) -> None:
        async with self._outbox, anyio.create_task_group() as tg:
            async for item in self._outbox:  # concurrently, so one slow peer delays no other
                self._sending += 1
                tg.start_soon(self._send, item)

    async def _send(self, item: Outgoing) -> None:
        try:
            await self.transport.send(item.to, item.message)
        except Exception:  # a message that cannot be encoded is a bug; it must not end the send loop
            if self._bug(f"send {type(item.message).__name__}"):
                log.exception("node=%s could not send a %s", self.coordinator.node_id, type(item.message).__name__)
        finally:
            self._sending -= 1


def _sender(message: FrozenModel) -> NodeId | None:
    """The node a coordinator message speaks for."""
    match message:
        case Heartbeat() | Leave():
            return message.node_id
        case EventBatch() | Snapshot():
            return message.master_id
    return None
