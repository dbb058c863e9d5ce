"""One exo node: its engine, its place in the cluster and its API, started and stopped together.

A stop (SIGTERM or SIGINT) goes in three phases, each bounded by its own timeout:
1. drain: new requests get 503 with Retry-After, the cluster hears this node drains, and the
   requests in flight (here, or on instances this node holds a rank of) finish;
2. channels: the node says it leaves, so its peers re-plan at once, delivers what its outbox
   holds, and closes the API once its open responses are sent;
3. resources: runners stop (asked, then SIGTERM, then SIGKILL), then discovery and sockets.
A second signal skips what is left of the waiting.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator

import anyio
import uvicorn
from zeroconf import InterfaceChoice

from exo import __version__
from exo.api.app import create_app
from exo.api.auth import sending_api_key
from exo.api.control import Admission
from exo.api.instances import ensure_instance
from exo.api.server import GuardedH11Protocol
from exo.config import Config
from exo.master.coordinator import Coordinator
from exo.master.service import ClusterService
from exo.models.catalog import ModelCatalog
from exo.models.peers import Holder, PeerFetcher
from exo.models.store import ModelStore
from exo.net.auth import ClusterAuth
from exo.net.discovery import Discovery
from exo.net.transport import PeerTransport
from exo.shared.errors import ExoError, ServiceUnavailable
from exo.shared.runners import RunnerStatus, runner_id
from exo.shared.state import NodeMode, NodeProfile, SharedModel
from exo.worker.profile import TermStore, load_node_id, measure_profile, ring_host
from exo.worker.supervisor import Limits, Supervisor
from exo.worker.tokenizers import Tokenizers

log = logging.getLogger(__name__)


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.catalog = ModelCatalog(ModelStore(config.models_dir))
        self.preload = [self.catalog.register(spec) for spec in config.preload]
        self.tokenizers = Tokenizers(self.catalog)
        node_id = load_node_id(config.home)
        terms = TermStore(config.home)

        def measure() -> NodeProfile:
            return measure_profile(node_id, address=config.api_host, api_port=config.api_port,
                                   memory_cap=config.max_memory).model_copy(update={"models": self.catalog.shared()})

        frame_key = config.cluster_secret or config.api_key  # peers prove the secret, or else the API key
        self.transport = PeerTransport(auth=ClusterAuth(frame_key, node_id=node_id, cluster=config.cluster)
                                       if frame_key else None)
        for host, port in config.peers:
            self.transport.add_seed(host, port)
        coordinator = Coordinator(measure(), cluster=config.cluster, term=terms.load(),
                                  peer_timeout=config.peer_timeout, on_term=terms.save)
        self.supervisor = Supervisor(node_id, self.catalog, host=ring_host(config.api_host, config.peers),
                                     dtype=config.dtype, kv_cache=config.kv_cache,
                                     report=lambda *worker: self.cluster.report_worker(*worker),
                                     limits=Limits(queue=config.queue_limit, watchdog_timeout=config.watchdog_timeout,
                                                   max_restarts=config.max_restarts,
                                                   stream_buffer=config.stream_buffer))
        self.cluster = ClusterService(coordinator, self.transport, measure=measure,
                                      heartbeat_interval=config.heartbeat_interval, dtype=config.dtype,
                                      kv_cache=config.kv_cache, context=config.context, queues=self.supervisor.queues,
                                      on_state=self.supervisor.update)
        self.catalog.advertised = self._advertised
        self.catalog.peers = PeerFetcher(config.models_dir, self._holders, self.transport.auth)
        self.admission = Admission(self.cluster)
        self.app = create_app(self.cluster, self.supervisor, self.tokenizers, api_key=config.api_key,
                              admission=self.admission, max_body_bytes=config.max_body_bytes)
        self._phase = log.info if config.debug_coordination else log.debug
        self._forced = anyio.Event()

    @property
    def node_id(self) -> str:
        return self.cluster.coordinator.node_id

    def _advertised(self) -> dict[str, SharedModel]:
        """The models other nodes of the cluster serve from their own files."""
        return {m.model_id: m for node in self.cluster.coordinator.state.nodes.values() if node.node_id != self.node_id
                for m in node.models}

    def _holders(self, model_id: str) -> list[Holder]:
        """The other nodes that serve `model_id` from their files now, and where their APIs are."""
        return [Holder(node.node_id, url, m) for node in self.cluster.coordinator.state.nodes.values()
                if node.node_id != self.node_id and (url := self.transport.url(node.node_id)) is not None
                for m in node.models if m.model_id == model_id]

    async def run(self) -> None:
        config = self.config
        # Phase 2 closes the API: responses still open then get this long to finish.
        server = _Server(uvicorn.Config(
            self.app, host=config.api_host, port=config.api_port, log_config=None,
            access_log=config.verbose, timeout_graceful_shutdown=max(config.channel_drain_timeout, 0.1),
            http=GuardedH11Protocol.with_limits(config.max_connections, config.request_timeout)))
        log.info("node=%s cluster=%s term=%d", self.node_id, config.cluster, self.cluster.coordinator.term)
        if not config.cluster_secret and not config.api_key:
            log.warning("no cluster secret set: any node on this network can join this cluster; "
                        "set --cluster-secret on every node")
        elif not config.cluster_secret:
            log.warning("an API key but no cluster secret: peers must prove the API key, so every client that "
                        "holds the key (or reads it off unencrypted HTTP) can join this cluster as a node; "
                        "set --cluster-secret on every node to keep the two apart")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._stop_on_signal, server, tg)
                await tg.start(self.supervisor.run)
                await tg.start(self.cluster.run)
                if config.discovery:
                    await tg.start(self._discover)
                for model_id in self.preload:
                    tg.start_soon(self._preload, model_id)
                await server.serve()
                self._phase("node=%s stop phase 3: releasing runners, discovery and sockets (up to %.0fs)",
                            self.node_id, config.resource_cleanup_timeout)
                await self.supervisor.stop(0 if self._forced.is_set() else config.resource_cleanup_timeout)
                tg.cancel_scope.cancel()  # runners still up are terminated, then killed, as they are reaped
        finally:
            with anyio.CancelScope(shield=True):
                await self.transport.aclose()
            log.info("node=%s stopped", self.node_id)

    async def _discover(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        host = self.config.api_host
        # Advertise only the address the API listens on, unless it listens on all of them.
        interfaces = InterfaceChoice.All if host in ("0.0.0.0", "::", "") else [host]
        discovery = Discovery(node_id=self.node_id, cluster=self.config.cluster, version=__version__,
                              api_port=self.config.api_port, on_peer=self.transport.announce,
                              on_peer_gone=self.transport.unannounce, interfaces=interfaces, auth=self.transport.auth)
        await discovery.run(task_status=task_status)

    async def _stop_on_signal(self, server: uvicorn.Server, tg: anyio.abc.TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.admission.stopping:
                    log.warning("node=%s second %s: stopping at once", self.node_id, name)
                    self._forced.set()
                    self._end_chats()  # not force_exit: uvicorn would leave its lifespan to be cancelled
                    server.should_exit = True
                else:
                    log.info("node=%s %s: stopping", self.node_id, name)
                    tg.start_soon(self._stop, server)

    async def _stop(self, server: uvicorn.Server) -> None:
        """Phases 1 and 2 of a stop; phase 3 follows in `run` once the API has closed."""
        config = self.config
        self.admission.stopping = True
        self.cluster.set_mode(NodeMode.DRAIN)
        self._phase("node=%s stop phase 1: no new requests; waiting for %d in flight (up to %.0fs)", self.node_id,
                    self._in_flight(), config.shutdown_timeout)
        with anyio.move_on_after(config.shutdown_timeout) as waited:
            while self._in_flight() and not self._forced.is_set():
                await anyio.sleep(0.05)
        if waited.cancelled_caught:
            log.warning("node=%s %d requests still in flight after %.0fs: stopping anyway", self.node_id,
                        self._in_flight(), config.shutdown_timeout)
        self._end_chats()
        self._phase("node=%s stop phase 2: leaving the cluster, draining channels (up to %.0fs)", self.node_id,
                    config.channel_drain_timeout)
        await self.cluster.leave(0 if self._forced.is_set() else config.channel_drain_timeout)
        server.should_exit = True

    def _end_chats(self) -> None:
        """Chats still running when phase 1 ends fail now (a stream with an error event and [DONE]), so
        the API closes with every response finished instead of uvicorn cancelling them mid-write."""
        self.supervisor.end_chats("This node is stopping; retry on another node or shortly.")

    def _in_flight(self) -> int:
        """Requests this node is serving, plus those on instances it holds a rank of for another head."""
        # A chat served here is one request at the API and one in its runner's queue: count it once.
        count = max(self.admission.in_flight, self.supervisor.queue_depth())
        state, queues = self.cluster.coordinator.state, self.cluster.all_queues()
        for handle in self.supervisor.runners.values():
            if handle.spec.rank == 0 or handle.exited.is_set():
                continue
            head = state.runners.get(runner_id(handle.spec.instance_id, 0))
            if queues.get(handle.spec.instance_id) or (head is not None and head.status == RunnerStatus.RUNNING):
                count += 1
        return count

    async def _preload(self, model_id: str) -> None:
        """Place the model once the cluster has a master, unless an instance of it exists."""
        while not self.admission.stopping:
            try:
                with sending_api_key(self.config.api_key):  # a follower asks the master to place it
                    await ensure_instance(self.cluster, self.tokenizers, model_id)
                return
            except ServiceUnavailable:
                await anyio.sleep(0.5)  # no master yet
            except ExoError as e:
                log.error("model=%s could not be placed: %s", model_id, e.message)
                return
            except Exception:  # a bug: the node still serves its other models
                log.exception("model=%s could not be placed", model_id)
                return


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the node handles SIGINT and SIGTERM itself, and exits 0 after a clean stop
