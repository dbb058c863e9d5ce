"""Builds a node's HTTP API from its parts."""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse

from exo import __version__
from exo.api.cluster import cluster_router
from exo.api.errors import install_error_handlers
from exo.api.instances import ensure_instance, instances_router
from exo.api.openai.router import openai_router
from exo.api.openai.serving import ChatService
from exo.master.service import ClusterService
from exo.worker.engine import LocalEngine

STALL_SECONDS = 120.0
DASHBOARD = Path(__file__).resolve().parents[2] / "dashboard" / "index.html"


def create_app(engine: LocalEngine, cluster: ClusterService | None = None) -> FastAPI:
    app = FastAPI(title="exo", version=__version__)
    install_error_handlers(app)
    ensure = None if cluster is None else functools.partial(ensure_instance, cluster)
    app.include_router(openai_router(ChatService(engine, ensure), engine.catalog))
    if cluster is not None:
        app.include_router(cluster_router(cluster))
        app.include_router(instances_router(cluster))

    @app.get("/health")
    async def health() -> JSONResponse:
        # Healthy means making progress: a busy engine that produced nothing for a while is not.
        idle_for = engine.clock() - engine.last_progress
        stalled = engine.active is not None and idle_for > STALL_SECONDS
        body = {"status": "stalled" if stalled else "ok", "version": __version__,
                "models_loaded": sorted(engine.models), "queue_depth": engine.queue_depth,
                "busy": engine.active is not None, "seconds_since_progress": round(idle_for, 3)}
        return JSONResponse(body, status_code=503 if stalled else 200)

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(DASHBOARD)

    return app
