"""Builds a node's HTTP API from its parts."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from exo import __version__
from exo.api.anthropic import anthropic_error, messages_router
from exo.api.auth import ApiKeyMiddleware
from exo.api.cluster import cluster_router
from exo.api.control import Admission, AdmissionMiddleware, control_router
from exo.api.errors import install_error_handlers
from exo.api.instances import instances_router, route
from exo.api.limits import BodyLimitMiddleware
from exo.api.metrics import MESSAGES_ENDPOINT, Metrics, metrics_router
from exo.api.ollama import OLLAMA_PREFIX, ollama_error, ollama_router
from exo.api.openai.router import openai_router
from exo.api.openai.serving import ChatService
from exo.api.peer_models import peer_models_router
from exo.api.runners import runners_router
from exo.config import Config
from exo.master.service import ClusterService
from exo.models.peers import ModelServer
from exo.net.transport import MESSAGE_PATH
from exo.shared.runners import SERVING, RunnerStatus
from exo.worker.supervisor import Supervisor
from exo.worker.tokenizers import Tokenizers

MAX_BODY_BYTES: int = Config.model_fields["max_body_bytes"].default
DASHBOARD = Path(__file__).resolve().parents[1] / "dashboard" / "index.html"  # package data: exo/dashboard/


class _Revalidated(StaticFiles):
    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def create_app(cluster: ClusterService, supervisor: Supervisor, tokenizers: Tokenizers,
               api_key: str | None = None, admission: Admission | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="exo", version=__version__)
    install_error_handlers(app, {MESSAGES_ENDPOINT: anthropic_error, OLLAMA_PREFIX: ollama_error})
    admission = admission or Admission(cluster)
    metrics = Metrics(cluster.coordinator, supervisor, cluster.clock, admission)
    for model in tokenizers.catalog.list():  # their series exist at 0 before the first chat for them
        metrics.known(model.id)
    app.add_middleware(AdmissionMiddleware, admission=admission, metrics=metrics)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    # outermost: before anything reads a body; peers' frames have their own cap, checked with their proof
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes, exempt=frozenset({MESSAGE_PATH}))
    def served() -> list[str]:
        return sorted({i.model_id for i in cluster.coordinator.state.instances.values()})

    chat = ChatService(supervisor, tokenizers, functools.partial(route, cluster, tokenizers, local=supervisor.serving),
                       metrics, served)
    app.include_router(openai_router(chat, tokenizers.catalog))
    app.include_router(messages_router(chat))
    app.include_router(ollama_router(chat, tokenizers.catalog))
    app.include_router(cluster_router(cluster))
    app.include_router(control_router(cluster, admission))
    app.include_router(instances_router(cluster))
    app.include_router(runners_router(cluster, supervisor))
    app.include_router(metrics_router(metrics))
    app.include_router(peer_models_router(ModelServer(lambda: tokenizers.catalog.local), cluster.transport.auth))

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        # Healthy means making progress: a runner with requests that produced nothing past the watchdog's
        # deadline is not, until it is replaced.
        now = time.monotonic()
        busy = any(h.chats or h.status == RunnerStatus.RUNNING for h in supervisor.runners.values())
        stall = supervisor.stall(now)
        status = "stalled" if stall else "stopping" if admission.stopping else "draining" if admission.draining \
            else "ok"
        body = {"status": status, "version": __version__, "mode": cluster.mode,
                "node_id": cluster.coordinator.node_id, "master_id": cluster.coordinator.master_id,
                "runners": {rid: h.status for rid, h in supervisor.runners.items()},
                "runners_ready": sum(h.status in SERVING for h in supervisor.runners.values()),
                "queue_depth": supervisor.queue_depth(), "busy": busy,
                "in_flight": admission.in_flight, "seconds_since_progress": round(supervisor.idle_for(now), 3),
                **({"reason": stall} if stall else {})}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(DASHBOARD, headers={"Cache-Control": "no-cache"})

    # the page's scripts and styles; no-cache (revalidated by ETag) so an upgraded node serves no stale mix
    app.mount("/dashboard", _Revalidated(directory=DASHBOARD.parent), name="dashboard")

    return app
