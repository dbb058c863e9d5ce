"""Anthropic's Messages API, `POST /v1/messages`: the same chats as /v1/chat/completions, in Anthropic's
request, response, streaming-event and error shapes, so Anthropic's SDKs and the apps built on them
work unchanged. Text only so far: content blocks of other types are refused by name.

A request becomes the equivalent chat completion request (the system prompt as the first message) and
takes the same way through the cluster: routed to the instance's rank 0, forwarded to its node if
that is another, cancelled when the client goes away.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from exo.api.errors import first_problem, retry_header
from exo.api.limits import MAX_MESSAGES, MAX_PARTS, ModelIdStr, Stops, Text
from exo.api.metrics import MESSAGES_ENDPOINT
from exo.api.openai.protocol import ChatCompletionRequest
from exo.api.openai.router import serve_chat
from exo.api.openai.serving import ChatService, PreparedChat
from exo.engine.generate import Delta
from exo.shared.errors import ExoError

# Anthropic's error types, by status (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 503: "overloaded_error"}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # metadata, top_k, service_tier, ...: accepted, not used


class TextBlock(_Request):
    type: Literal["text"]
    text: Text


class Message(_Request):
    role: Literal["user", "assistant"]
    content: Text | Annotated[list[TextBlock], Field(min_length=1, max_length=MAX_PARTS)]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


class MessagesRequest(_Request):
    model: ModelIdStr
    max_tokens: int = Field(ge=1, lt=2**31)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: Text | Annotated[list[TextBlock], Field(max_length=MAX_PARTS)] | None = None
    stop_sequences: Stops | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False

    def as_chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion."""
        system = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system or ())
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": m.role, "content": m.text} for m in self.messages]
        return ChatCompletionRequest(model=self.model, messages=messages, max_tokens=self.max_tokens,
                                     temperature=self.temperature, top_p=self.top_p,
                                     stop=list(self.stop_sequences or ()), stream=self.stream)


class Usage(BaseModel):
    input_tokens: int  # of the prompt, computed for this request
    output_tokens: int
    cache_read_input_tokens: int = 0  # of the prompt, taken from the prefix cache


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, str]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence"] | None
    stop_sequence: str | None
    usage: Usage


def anthropic_error(status: int, message: str) -> JSONResponse:
    """An error in Anthropic's shape: `{"type": "error", "error": {"type", "message"}}`."""
    return JSONResponse(_error_body(status, message), status_code=status, headers=retry_header(status))


def _error_body(status: int, message: str) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def stream_cut(error: ExoError) -> bytes:
    """What ends a forwarded stream its serving node stopped: an `error` event, as Anthropic's streams end."""
    return ("\n\n" + _event("error", _error_body(error.status_code, error.message))).encode()


def messages_router(chat: ChatService) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/messages", response_model=None)
    async def messages(request: Request) -> Response:
        try:
            body = MessagesRequest.model_validate_json(await request.body())
        except ValidationError as e:
            return anthropic_error(400, first_problem(e))
        return await serve_chat(chat, request, body.as_chat(), MESSAGES_ENDPOINT,
                                events=lambda prepared: _events(chat, prepared),
                                whole=lambda prepared: _complete(chat, prepared), cut=stream_cut,
                                refuse=lambda e: anthropic_error(e.status_code, e.message))

    return router


async def _complete(chat: ChatService, prepared: PreparedChat) -> JSONResponse:
    text, last = [], Delta("", 0)
    with prepared.record:
        async for delta in chat.deltas(prepared):
            text.append(delta.text)
            last = delta
    return JSONResponse(MessageResponse(id=_message_id(), model=prepared.request.model,
                                        content=[{"type": "text", "text": "".join(text)}], **_ending(last),
                                        usage=_usage(prepared, last)).model_dump())


async def _events(chat: ChatService, prepared: PreparedChat) -> AsyncIterator[str]:
    """Anthropic's server-sent events: message_start, one text block (its start, deltas and stop),
    message_delta with the stop reason and usage, message_stop; an error event if the chat fails."""
    start = {"id": _message_id(), "type": "message", "role": "assistant", "model": prepared.request.model,
             "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": len(prepared.prompt), "output_tokens": 0}}
    with prepared.record:
        yield _event("message_start", {"message": start})
        yield _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        try:
            async for delta in chat.deltas(prepared):
                if delta.text:
                    yield _event("content_block_delta", {"index": 0, "delta": {"type": "text_delta",
                                                                               "text": delta.text}})
                if delta.finish_reason:
                    yield _event("content_block_stop", {"index": 0})
                    yield _event("message_delta", {"delta": _ending(delta),
                                                   "usage": _usage(prepared, delta).model_dump()})
                    yield _event("message_stop", {})
        except ExoError as e:
            prepared.record.fail(e)
            yield _event("error", _error_body(e.status_code, e.message))


def _ending(delta: Delta) -> dict[str, Any]:
    reason = {"length": "max_tokens", "stop": "stop_sequence" if delta.stop_sequence else "end_turn"}
    return {"stop_reason": reason.get(delta.finish_reason or "", None), "stop_sequence": delta.stop_sequence}


def _usage(prepared: PreparedChat, delta: Delta) -> Usage:
    return Usage(input_tokens=len(prepared.prompt) - delta.cached_tokens, output_tokens=delta.n_tokens,
                 cache_read_input_tokens=delta.cached_tokens)


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"


def _message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"

