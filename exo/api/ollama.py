"""Ollama's API, so Ollama's clients and the apps built on them work against exo unchanged: `/api/chat`
and `/api/generate` (streamed as Ollama streams, one JSON object a line, unless `"stream": false`),
`/api/tags`, `/api/show`, `/api/ps` and `/api/version`. Text only so far: tools, images and `format`
are refused by name.

A chat becomes the equivalent chat completion request (`/api/generate` the same, or a raw text
completion with `"raw": true`) and takes the same way through the cluster: routed to the instance's
rank 0, forwarded to its node if that is another, cancelled when the client goes away. Sampling
defaults are Ollama's (temperature 0.8, top_p 0.9).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from exo import __version__
from exo.api.errors import first_problem, retry_header
from exo.api.limits import MAX_MESSAGES, ModelIdStr, Stops, Text
from exo.api.metrics import OLLAMA_CHAT_ENDPOINT, OLLAMA_GENERATE_ENDPOINT
from exo.api.openai.protocol import ChatCompletionRequest, CompletionRequest
from exo.api.openai.router import serve_chat
from exo.api.openai.serving import ChatService, PreparedChat
from exo.engine.generate import Delta
from exo.models.cards import CARDS
from exo.models.catalog import ModelCatalog
from exo.shared.errors import ExoError

NDJSON = "application/x-ndjson"
OLLAMA_PREFIX = "/api/"


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # keep_alive, think, ...: accepted, not used


class Options(_Request):
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    num_predict: int | None = Field(default=None, ge=-2, lt=2**31)  # -1, -2 or none: up to the context
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stop: Stops | None = None

    @property
    def max_tokens(self) -> int | None:
        return self.num_predict if self.num_predict and self.num_predict > 0 else None


class _Generation(_Request):
    model: ModelIdStr
    stream: bool = True  # Ollama streams unless told not to
    options: Options = Options()
    format: None = None  # "json" or a schema: not yet
    images: None = None

    def sampling(self) -> dict[str, Any]:
        o = self.options
        return {"model": self.model, "max_tokens": o.max_tokens, "temperature": o.temperature, "top_p": o.top_p,
                "seed": o.seed, "stop": list(o.stop or ()), "stream": self.stream, "min_p": o.min_p,
                "presence_penalty": o.presence_penalty, "frequency_penalty": o.frequency_penalty}


class OllamaMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: Text = ""
    images: None = None


class ChatRequest(_Generation):
    messages: list[OllamaMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    tools: Annotated[list[Any], Field(max_length=0)] | None = None  # tool calling: not yet

    def as_openai(self) -> ChatCompletionRequest:
        return ChatCompletionRequest(messages=[{"role": m.role, "content": m.content} for m in self.messages],
                                     **self.sampling())


class GenerateRequest(_Generation):
    prompt: Text = Field(min_length=1)
    system: Text | None = None
    raw: bool = False  # the prompt as it is, without the chat template

    def as_openai(self) -> ChatCompletionRequest | CompletionRequest:
        if self.raw:
            return CompletionRequest(prompt=self.prompt, **self.sampling())
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return ChatCompletionRequest(messages=[*messages, {"role": "user", "content": self.prompt}],
                                     **self.sampling())


class ShowRequest(_Request):
    model: ModelIdStr | None = None
    name: ModelIdStr | None = None  # the older spelling


def ollama_error(status: int, message: str) -> JSONResponse:
    """An error as Ollama answers one: `{"error": message}`."""
    return JSONResponse({"error": message}, status_code=status, headers=retry_header(status))


def stream_cut(error: ExoError) -> bytes:
    """What ends a forwarded stream its serving node stopped: an error line, as Ollama's streams end."""
    return ("\n" + json.dumps({"error": error.message}) + "\n").encode()


def ollama_router(chat: ChatService, catalog: ModelCatalog) -> APIRouter:
    router = APIRouter(prefix="/api")

    @router.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @router.get("/tags")
    async def tags() -> dict[str, list[dict[str, Any]]]:
        return {"models": [_model(m.id) for m in catalog.list()]}

    @router.get("/ps")
    async def ps() -> dict[str, list[dict[str, Any]]]:
        return {"models": [{**_model(m), "expires_at": "2999-01-01T00:00:00Z", "size_vram": 0}
                           for m in chat.served()]}

    @router.post("/show", response_model=None)
    async def show(request: Request) -> Response:
        try:
            body = ShowRequest.model_validate_json(await request.body())
        except ValidationError as e:
            return ollama_error(400, first_problem(e))
        model = body.model or body.name
        if model not in {m.id for m in catalog.list()}:
            return ollama_error(404, f"model {model!r} not found; GET /api/tags lists the models")
        card = CARDS.get(model)
        return JSONResponse({"modelfile": "", "parameters": "", "template": "", "details": _model(model)["details"],
                             "license": card.license if card else "", "capabilities": ["completion"],
                             "model_info": {"general.context_length": card.context_length} if card else {}})

    @router.post("/chat", response_model=None)
    async def chat_route(request: Request) -> Response:
        return await _serve(chat, request, ChatRequest, OLLAMA_CHAT_ENDPOINT)

    @router.post("/generate", response_model=None)
    async def generate(request: Request) -> Response:
        return await _serve(chat, request, GenerateRequest, OLLAMA_GENERATE_ENDPOINT)

    return router


async def _serve(chat: ChatService, request: Request, kind: type[ChatRequest] | type[GenerateRequest],
                 endpoint: str) -> Response:
    try:
        body = kind.model_validate_json(await request.body())
    except ValidationError as e:
        return ollama_error(400, first_problem(e))
    started, is_chat = time.perf_counter(), kind is ChatRequest
    return await serve_chat(chat, request, body.as_openai(), endpoint, media_type=NDJSON, cut=stream_cut,
                            events=lambda prepared: _lines(chat, prepared, _Shape(prepared, is_chat, started)),
                            whole=lambda prepared: _whole(chat, prepared, _Shape(prepared, is_chat, started)),
                            refuse=lambda e: ollama_error(e.status_code, e.message))


class _Shape:
    """One request's answers in Ollama's form: a chat's `message` or a generation's `response`, and the
    counts and durations (in nanoseconds) of the last."""

    def __init__(self, prepared: PreparedChat, is_chat: bool, started: float) -> None:
        self.model, self.n_prompt = prepared.request.model, len(prepared.prompt)
        self.is_chat, self.started = is_chat, started
        self.first: float | None = None  # when the first piece went out

    def arrived(self) -> None:
        """A piece of the answer came (the first one ends the prompt's evaluation)."""
        self.first = self.first or time.perf_counter()

    def piece(self, text: str) -> dict[str, Any]:
        self.arrived()
        body = {"message": {"role": "assistant", "content": text}} if self.is_chat else {"response": text}
        return {"model": self.model, "created_at": datetime.now(UTC).isoformat(), **body, "done": False}

    def last(self, text: str, delta: Delta) -> dict[str, Any]:
        now = time.perf_counter()
        first = self.first or now
        return {**self.piece(text), "done": True, "done_reason": delta.finish_reason,
                "total_duration": int((now - self.started) * 1e9), "load_duration": 0,
                "prompt_eval_count": self.n_prompt - delta.cached_tokens,
                "prompt_eval_duration": int((first - self.started) * 1e9),
                "eval_count": delta.n_tokens, "eval_duration": int((now - first) * 1e9)}


async def _whole(chat: ChatService, prepared: PreparedChat, shape: _Shape) -> JSONResponse:
    text, last = [], Delta("", 0)
    with prepared.record:
        async for delta in chat.deltas(prepared):
            shape.arrived()
            text.append(delta.text)
            last = delta
    return JSONResponse(shape.last("".join(text), last))


async def _lines(chat: ChatService, prepared: PreparedChat, shape: _Shape) -> AsyncIterator[str]:
    with prepared.record:
        try:
            async for delta in chat.deltas(prepared):
                if delta.finish_reason:
                    yield json.dumps(shape.last(delta.text, delta), separators=(",", ":")) + "\n"
                elif delta.text:
                    yield json.dumps(shape.piece(delta.text), separators=(",", ":")) + "\n"
        except ExoError as e:
            prepared.record.fail(e)
            yield json.dumps({"error": e.message}) + "\n"


def _model(model_id: str) -> dict[str, Any]:
    """A model as /api/tags lists it."""
    card = CARDS.get(model_id)
    quant = found.group(1) if card and (found := re.search(r"\b(Q\d[A-Z0-9_]*)\b", card.name)) else ""
    details = {"format": "gguf", "family": "", "families": None, "parameter_size": _params(card.n_params) if card
               else "", "quantization_level": quant, "parent_model": ""}
    return {"name": model_id, "model": model_id, "modified_at": "1970-01-01T00:00:00Z",
            "size": card.bytes if card else 0, "digest": card.source.sha256 if card else "", "details": details}


def _params(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{round(n / 1e6)}M"

