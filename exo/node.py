"""One exo node: its engine and its API, started together and stopped together."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator

import anyio
import uvicorn

from exo.api.app import create_app
from exo.config import Config
from exo.models.catalog import ModelCatalog
from exo.models.store import ModelStore
from exo.shared.errors import ExoError
from exo.worker.engine import LocalEngine

log = logging.getLogger(__name__)


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.catalog = ModelCatalog(ModelStore(config.models_dir))
        self.preload = [self.catalog.register(spec) for spec in config.preload]
        self.engine = LocalEngine(self.catalog, dtype=config.dtype)
        self.app = create_app(self.engine)

    async def run(self) -> None:
        server = _Server(uvicorn.Config(
            self.app, host=self.config.api_host, port=self.config.api_port, log_config=None,
            access_log=self.config.verbose, timeout_graceful_shutdown=30))
        self.engine.start()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._stop_on_signal, server)
                for model_id in self.preload:
                    tg.start_soon(self._preload, model_id)
                await server.serve()
                tg.cancel_scope.cancel()
        finally:
            await anyio.to_thread.run_sync(self.engine.stop)
            log.info("node stopped")

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
        try:
            await self.engine.load(model_id)
            log.info("model=%s ready", model_id)
        except ExoError as e:
            log.error("model=%s could not be preloaded: %s", model_id, e.message)



class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the node handles SIGINT and SIGTERM itself, and exits 0 after a clean stop
