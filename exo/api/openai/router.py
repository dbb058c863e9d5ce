"""The OpenAI-compatible endpoints: /v1/chat/completions and /v1/models."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from exo.api.openai.protocol import ChatCompletion, ChatCompletionRequest, ModelCard, ModelList
from exo.api.openai.serving import ChatService
from exo.models.catalog import ModelCatalog

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nobody reads it: the client is gone


def openai_router(chat: ChatService, catalog: ModelCatalog) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(**info.model_dump(exclude={"local_path"})) for info in catalog.list()])

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletion | Response:
        prepared = await _unless_disconnected(request, chat.prepare(body))
        if prepared is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        if body.stream:
            # StreamingResponse cancels the body's iterator when the client disconnects.
            return StreamingResponse(chat.stream(prepared), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        completion = await _unless_disconnected(request, chat.complete(prepared))
        return Response(status_code=CLIENT_CLOSED_REQUEST) if completion is None else completion

    return router


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work`, cancelling it (and so its generation) if the client disconnects first."""
    outcome: list[T | Exception] = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            try:
                outcome.append(await work)
            except Exception as e:  # re-raised below, outside the task group's exception group
                outcome.append(e)
            tg.cancel_scope.cancel()

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(run)
        tg.start_soon(watch)
    if outcome and isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0] if outcome else None
