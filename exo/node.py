"""One exo node: its engine, its place in the cluster and its API, started and stopped together."""

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
from exo.api.instances import ensure_instance
from exo.config import Config
from exo.master.coordinator import Coordinator
from exo.master.service import ClusterService
from exo.models.catalog import ModelCatalog
from exo.models.store import ModelStore
from exo.net.discovery import Discovery
from exo.net.transport import PeerTransport
from exo.shared.errors import ExoError, ServiceUnavailable
from exo.shared.state import NodeProfile
from exo.worker.profile import TermStore, load_node_id, measure_profile, ring_host
from exo.worker.supervisor import Supervisor
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
                                   memory_cap=config.max_memory)

        self.transport = PeerTransport()
        for host, port in config.peers:
            self.transport.add_seed(host, port)
        coordinator = Coordinator(measure(), cluster=config.cluster, term=terms.load(),
                                  peer_timeout=config.peer_timeout, on_term=terms.save)
        self.supervisor = Supervisor(node_id, self.catalog, host=ring_host(config.api_host, config.peers),
                                     dtype=config.dtype, report=lambda *worker: self.cluster.report_worker(*worker))
        self.cluster = ClusterService(coordinator, self.transport, measure=measure,
                                      heartbeat_interval=config.heartbeat_interval, dtype=config.dtype,
                                      on_state=self.supervisor.update)
        self.app = create_app(self.cluster, self.supervisor, self.tokenizers)

    @property
    def node_id(self) -> str:
        return self.cluster.coordinator.node_id

    async def run(self) -> None:
        server = _Server(uvicorn.Config(
            self.app, host=self.config.api_host, port=self.config.api_port, log_config=None,
            access_log=self.config.verbose, timeout_graceful_shutdown=30))
        log.info("node=%s cluster=%s term=%d", self.node_id, self.config.cluster, self.cluster.coordinator.term)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._stop_on_signal, server)
                await tg.start(self.supervisor.run)
                await tg.start(self.cluster.run)
                if self.config.discovery:
                    await tg.start(self._discover)
                for model_id in self.preload:
                    tg.start_soon(self._preload, model_id)
                await server.serve()
                tg.cancel_scope.cancel()
        finally:
            await self.transport.aclose()
            log.info("node stopped")

    async def _discover(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        host = self.config.api_host
        # Advertise only the address the API listens on, unless it listens on all of them.
        interfaces = InterfaceChoice.All if host in ("0.0.0.0", "::", "") else [host]
        discovery = Discovery(node_id=self.node_id, cluster=self.config.cluster, version=__version__,
                              api_port=self.config.api_port, on_peer=self.transport.add_seed, interfaces=interfaces)
        await discovery.run(task_status=task_status)

    async def _stop_on_signal(self, server: uvicorn.Server) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if server.should_exit:
                    log.warning("second %s: stopping at once", signal.Signals(signum).name)
                    server.force_exit = True
                else:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    server.should_exit = True

    async def _preload(self, model_id: str) -> None:
        """Place the model once the cluster has a master, unless an instance of it exists."""
        while True:
            try:
                await ensure_instance(self.cluster, self.tokenizers, model_id)
                return
            except ServiceUnavailable:
                await anyio.sleep(0.5)  # no master yet
            except ExoError as e:
                log.error("model=%s could not be placed: %s", model_id, e.message)
                return


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the node handles SIGINT and SIGTERM itself, and exits 0 after a clean stop
