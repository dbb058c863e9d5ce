"""The OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions and /v1/models."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
import httpx
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from exo.api.auth import forward_headers
from exo.api.errors import error_body
from exo.api.metrics import CLIENT_CLOSED_REQUEST
from exo.api.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    ModelList,
    TextCompletion,
)
from exo.api.openai.serving import ChatService, PreparedChat, RemoteChat, Slot
from exo.models.catalog import ModelCatalog
from exo.shared.errors import ExoError, ServiceUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
FORWARDED = "x-exo-forwarded"  # set on a request one node hands to another, which must then serve it itself


def openai_router(chat: ChatService, catalog: ModelCatalog) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def list_models() -> ModelList:
        return ModelList(data=catalog.list())

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletion | Response:
        return await serve(body, request)

    @router.post("/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> TextCompletion | Response:
        return await serve(body, request)

    async def serve(body: ChatCompletionRequest | CompletionRequest,
                    request: Request) -> ChatCompletion | TextCompletion | Response:
        endpoint = request.scope["route"].path  # the metrics' endpoint label: one of these two routes
        return await serve_chat(chat, request, body, endpoint, events=chat.stream, whole=chat.complete)

    return router


def _openai_cut(error: ExoError) -> bytes:
    return f"\n\ndata: {json.dumps(error_body(error))}\n\ndata: [DONE]\n\n".encode()


async def serve_chat(chat: ChatService, request: Request, body: ChatCompletionRequest | CompletionRequest,
                     endpoint: str, *, events: Callable[[PreparedChat], AsyncIterator[str]],
                     whole: Callable[[PreparedChat], Awaitable[T]], media_type: str = "text/event-stream",
                     cut: Callable[[ExoError], bytes] = _openai_cut,
                     refuse: Callable[[ExoError], Response] | None = None) -> T | Response:
    """Serve a chat route's request, whatever API shapes it: prepared for its instance's rank 0 (handed
    to that node if it is another, with `cut` ending a stream it stops), then streamed as `events`
    writes it or answered `whole`; 499 once the client has gone. `refuse` answers an error in the
    route's own shape; without it the error goes to the app's handlers (OpenAI's shape)."""
    try:
        prepared = await unless_disconnected(request, chat.prepare(body, forwarded=FORWARDED in request.headers,
                                                                  endpoint=endpoint))
        if prepared is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        if isinstance(prepared, RemoteChat):
            return await forward(request, prepared.url, cut=cut)
        if body.stream:
            # StreamingResponse cancels the body's iterator when the client disconnects.
            return SlotStream(prepared.slot, events(prepared), media_type=media_type,
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            answer = await unless_disconnected(request, whole(prepared))
        finally:
            prepared.slot.release()  # the chat gave it up as it started, unless it never did
        return Response(status_code=CLIENT_CLOSED_REQUEST) if answer is None else answer
    except ExoError as e:
        if refuse is None:
            raise
        return refuse(e)


class SlotStream(StreamingResponse):
    """A chat's stream, whose queue slot is given back however the response ends, even unstarted."""

    def __init__(self, slot: Slot, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


async def forward(request: Request, url: str, cut: Callable[[ExoError], bytes] = _openai_cut) -> Response:
    """Hand the request to the node that serves it, and its answer (streamed as it comes) back. A client
    that goes away before the answer starts (all of a non-streamed chat) closes the upstream request,
    which cancels its generation there. A stream the serving node stops mid-way ends with `cut`'s
    events (OpenAI's error event and [DONE] by default)."""
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5))
    upstream = client.build_request("POST", url + request.url.path, content=await request.body(),
                                    headers={"content-type": "application/json", FORWARDED: "1", **forward_headers()})
    try:
        response = await unless_disconnected(request, client.send(upstream, stream=True))
    except httpx.HTTPError as e:
        await client.aclose()
        raise ServiceUnavailable(f"The node serving this model did not answer ({type(e).__name__}); retry.") from e
    except BaseException:
        with anyio.CancelScope(shield=True):
            await client.aclose()
        raise
    if response is None:
        await client.aclose()
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    async def body() -> AsyncIterator[bytes]:
        try:
            async for piece in response.aiter_raw():
                yield piece
        except httpx.HTTPError as e:
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                raise
            # The serving node died mid-stream: end the client's stream as a failed one, not a cut one.
            log.warning("forwarded stream from %s cut: %s", url, type(e).__name__)
            yield cut(ServiceUnavailable(f"The node serving this model stopped mid-stream ({type(e).__name__}); "
                                         "retry."))
        finally:  # also when our client went away: closing the upstream cancels its generation
            await response.aclose()
            await client.aclose()

    headers = {k: v for k, v in response.headers.items() if k.lower() in ("content-type", "cache-control",
                                                                                "retry-after")}
    return StreamingResponse(body(), status_code=response.status_code, headers=headers)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
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
