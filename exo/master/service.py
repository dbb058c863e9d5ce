"""Runs this node's Coordinator: ticks it, feeds it peers' messages, sends what it answers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from exo.master.coordinator import Coordinator, Outgoing
from exo.master.planner import place
from exo.models.cards import ModelCard
from exo.net.messages import CODEC, Heartbeat
from exo.net.transport import PeerTransport
from exo.shared.errors import ServiceUnavailable
from exo.shared.events import InstanceCreated, InstanceDeleted
from exo.shared.runners import RunnerInfo, TaskInfo
from exo.shared.state import Instance, NodeProfile, State
from exo.shared.types import Dtype, InstanceId, new_instance_id

log = logging.getLogger(__name__)

PROFILE_REFRESH_SECONDS = 5.0


class ClusterService:
    def __init__(self, coordinator: Coordinator, transport: PeerTransport, *, measure: Callable[[], NodeProfile],
                 heartbeat_interval: float = 0.5, dtype: Dtype = "float32",
                 on_state: Callable[[State], None] = lambda state: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.coordinator, self.transport, self.measure, self.on_state = coordinator, transport, measure, on_state
        self.heartbeat_interval, self.dtype, self.clock = heartbeat_interval, dtype, clock
        self._outbox_in, self._outbox = anyio.create_memory_object_stream[Outgoing](max_buffer_size=1024)
        self._worker_changed = anyio.Event()
        self._published: State | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._send_loop)
            task_status.started()
            last_profile = self.clock()
            while True:
                if self.clock() - last_profile >= PROFILE_REFRESH_SECONDS:
                    self.coordinator.update_profile(self.measure())
                    last_profile = self.clock()
                self._post(self.coordinator.tick(self.clock()))
                with anyio.move_on_after(self.heartbeat_interval):
                    await self._worker_changed.wait()
                self._worker_changed = anyio.Event()

    def report_worker(self, runners: tuple[RunnerInfo, ...], tasks: tuple[TaskInfo, ...]) -> None:
        """This node's runners changed: heartbeat now rather than at the next interval (reports that
        come together go out in one heartbeat)."""
        self.coordinator.update_worker(runners, tasks)
        self._worker_changed.set()

    def receive(self, frame: bytes, sender_host: str) -> None:
        """Handle one frame from a peer. Raises WireError for a frame that is not a valid message."""
        message = CODEC.decode(frame)
        if isinstance(message, Heartbeat):
            self.transport.learn(message.node_id, sender_host, message.profile.api_port)
        self._post(self.coordinator.receive(message, self.clock()))

    # -- master commands (the API forwards them to the master) -----------------------------------

    def place_instance(self, card: ModelCard, *, min_nodes: int = 1) -> Instance:
        self._require_master()
        state = self.coordinator.state
        shards = place(card, list(state.nodes.values()), model_bytes=card.memory_bytes(self.dtype),
                       min_nodes=min_nodes)
        return self.add_instance(Instance(instance_id=new_instance_id(), model_id=card.id,
                                          n_layers=card.n_layers, shards=shards))

    def add_instance(self, instance: Instance) -> Instance:
        self._require_master()
        self._post(self.coordinator.emit(lambda i, t: InstanceCreated(index=i, term=t, instance=instance)))
        log.info("instance=%s model=%s placed on %s", instance.instance_id, instance.model_id,
                 ", ".join(f"{s.node_id}[{s.start}:{s.end})" for s in instance.shards))
        return instance

    def delete_instance(self, instance_id: InstanceId) -> None:
        self._require_master()
        self._post(self.coordinator.emit(lambda i, t: InstanceDeleted(index=i, term=t, instance_id=instance_id)))

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
                tg.start_soon(self.transport.send, item.to, item.message)
