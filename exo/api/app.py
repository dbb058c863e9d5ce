"""Builds a node's HTTP API from its parts."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from exo import __version__
from exo.api.errors import install_error_handlers
from exo.api.openai.router import openai_router
from exo.api.openai.serving import ChatService
from exo.worker.engine import LocalEngine

STALL_SECONDS = 120.0


def create_app(engine: LocalEngine) -> FastAPI:
    app = FastAPI(title="exo", version=__version__)
    install_error_handlers(app)
    app.include_router(openai_router(ChatService(engine), engine.catalog))

    @app.get("/health")
    async def health() -> JSONResponse:
        # Healthy means making progress: a busy engine that produced nothing for a while is not.
        idle_for = engine.clock() - engine.last_progress
        stalled = engine.active is not None and idle_for > STALL_SECONDS
        body = {"status": "stalled" if stalled else "ok", "version": __version__,
                "models_loaded": sorted(engine.models), "queue_depth": engine.queue_depth,
                "busy": engine.active is not None, "seconds_since_progress": round(idle_for, 3)}
        return JSONResponse(body, status_code=503 if stalled else 200)

    return app
