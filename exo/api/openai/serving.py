"""Chat and text completions: find the instance, turn the request into a prompt, stream the answer back.

The node whose runner holds rank 0 of the instance renders the prompt and streams the text;
any other node hands the request to that node as it came (see `router.py`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import anyio

from exo.api.errors import error_body
from exo.api.metrics import CHAT_ENDPOINT, ChatRecord, Metrics
from exo.api.openai.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionRequest,
    DeltaMessage,
    PromptTokensDetails,
    TextChoice,
    TextCompletion,
    Usage,
    completion_id,
    now,
)
from exo.engine.generate import Delta, FinishReason
from exo.shared.errors import ContextTooLong, ExoError, InvalidRequest, Overloaded
from exo.shared.generation import GenerationParams
from exo.shared.state import Instance
from exo.shared.types import InstanceId
from exo.worker.supervisor import Supervisor
from exo.worker.tokenizers import Tokenizers


@dataclass
class Slot:
    """A place in an instance's queue, held from admission until the chat is in the queue itself, so
    that requests admitted together cannot overfill it (and get their 503 only inside a 200 stream)."""

    reserved: Counter[InstanceId]
    instance_id: InstanceId
    held: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        self.reserved[self.instance_id] += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.reserved[self.instance_id] -= 1


@dataclass(frozen=True)
class PreparedChat:
    request: ChatCompletionRequest | CompletionRequest
    instance: Instance
    prompt: list[int]
    params: GenerationParams
    record: ChatRecord
    slot: Slot


@dataclass(frozen=True)
class RemoteChat:
    """A request for an instance whose rank 0 lives on another node: that node serves it."""

    url: str


class ChatService:
    def __init__(self, supervisor: Supervisor, tokenizers: Tokenizers,
                 route: Callable[[str, bool], Awaitable[tuple[Instance, str | None]]], metrics: Metrics,
                 served: Callable[[], list[str]] = list) -> None:
        self.supervisor, self.tokenizers, self.route, self.metrics = supervisor, tokenizers, route, metrics
        self.served = served  # the models the cluster has instances of, for a request that names none
        self.reserved: Counter[InstanceId] = Counter()  # slots admitted chats hold until they are queued

    async def prepare(self, request: ChatCompletionRequest | CompletionRequest, *, forwarded: bool = False,
                      endpoint: str = CHAT_ENDPOINT) -> PreparedChat | RemoteChat:
        """Find a ready instance; if its rank 0 is here, render and tokenize the conversation and
        check that it fits the model's context."""
        record = self.metrics.chat(forwarded=forwarded, endpoint=endpoint)  # time to first token counts from here
        try:
            return await self._prepare(request, forwarded, record)
        except BaseException as e:
            record.fail(e)
            record.end()
            raise

    async def _prepare(self, request: ChatCompletionRequest | CompletionRequest, forwarded: bool,
                       record: ChatRecord) -> PreparedChat | RemoteChat:
        if request.model is None:
            request = request.model_copy(update={"model": self._only_model()})
        assert request.model is not None
        self.tokenizers.catalog.check(request.model)
        record.served(request.model)
        instance, remote_url = await self.route(request.model, forwarded)
        if remote_url is not None:
            return RemoteChat(remote_url)  # counted by the node that serves it
        slot = self._admit(instance.instance_id)  # a full queue is a 503 before any stream begins
        try:
            prompt, context = await self._tokenize(request, instance)
            return PreparedChat(request, instance, prompt, _params(request, prompt, context), record, slot)
        except BaseException:
            slot.release()
            raise

    def _only_model(self) -> str:
        """The model a request without one goes to: the one the cluster serves (as llama.cpp's and vLLM's
        servers answer for theirs)."""
        match self.served():
            case [model]:
                return model
            case []:
                raise InvalidRequest("No model is served yet, so the request must name one in `model`; GET /v1/models "
                                     "lists them.", param="model")
            case several:
                raise InvalidRequest(f"Several models are served ({', '.join(several)}): name one in `model`.",
                                     param="model")

    def _admit(self, instance_id: InstanceId) -> Slot:
        handle = self.supervisor.admit(instance_id)
        waiting = len(handle.chats) + self.reserved[instance_id]
        if waiting >= self.supervisor.limits.queue:
            raise Overloaded(f"Instance {instance_id} has {waiting} requests waiting, its limit; retry shortly.")
        return Slot(self.reserved, instance_id)

    async def _tokenize(self, request: ChatCompletionRequest | CompletionRequest,
                        instance: Instance) -> tuple[list[int], int]:
        """The prompt's tokens and the context `instance` serves (placed with it, within the model's),
        off the event loop; a prompt too long for the context by its length alone is refused before it
        is rendered."""
        tokenizer, args = await self.tokenizers.get(request.model)
        context = min(instance.context or args.max_position_embeddings, args.max_position_embeddings)
        chars, field = request.prompt_chars, request.prompt_field
        per_token = await anyio.to_thread.run_sync(lambda: tokenizer.max_token_bytes)
        if chars > context * per_token:
            raise ContextTooLong(f"The {field} are {chars} characters long, at least {chars // per_token} tokens, "
                                 f"but the context served is {context} tokens. Shorten the {field}.", param=field)
        if isinstance(request, CompletionRequest):  # as llama.cpp's server: control tokens' text is markup
            return await anyio.to_thread.run_sync(tokenizer.encode, request.text), context
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text}
                    for m in request.messages]
        return await anyio.to_thread.run_sync(tokenizer.encode_chat, messages), context

    async def deltas(self, chat: PreparedChat) -> AsyncIterator[Delta]:
        """The chat's text from its instance's rank 0 as it comes, recorded in the metrics (the time to
        each piece, the prompt tokens the prefix cache held). The chat gives its queue slot up as it
        starts, with no wait between."""
        chat.slot.release()
        async for delta in self.supervisor.chat(chat.instance.instance_id, chat.prompt, chat.params):
            chat.record.generated(delta.n_tokens)
            if delta.finish_reason:
                chat.record.cached(delta.cached_tokens)
            yield delta

    async def complete(self, chat: PreparedChat) -> ChatCompletion | TextCompletion:
        text, last = [], Delta("", 0, "length")
        with chat.record:
            async for delta in self.deltas(chat):
                text.append(delta.text)
                last = delta
        usage = _usage(chat, last.n_tokens, last.cached_tokens)
        finish = last.finish_reason or "length"
        if isinstance(chat.request, CompletionRequest):
            return TextCompletion(id=completion_id("cmpl"), created=now(), model=chat.request.model,
                                  choices=[TextChoice(text="".join(text), finish_reason=finish)], usage=usage)
        return ChatCompletion(id=completion_id(), created=now(), model=chat.request.model,
                              choices=[Choice(message=AssistantMessage(content="".join(text)), finish_reason=finish)],
                              usage=usage)

    async def stream(self, chat: PreparedChat) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`: for a chat, a first
        chunk with the role, then the text; for a text completion, the text alone."""
        request = chat.request
        chunk: ChatCompletionChunk | TextCompletion
        if isinstance(request, CompletionRequest):
            chunk = TextCompletion(id=completion_id("cmpl"), created=now(), model=request.model, choices=[])
            opening = None

            def choice(text: str, finish: FinishReason | None) -> TextChoice | ChunkChoice:
                return TextChoice(text=text, finish_reason=finish)
        else:
            chunk = ChatCompletionChunk(id=completion_id(), created=now(), model=request.model, choices=[])
            opening = chunk.model_copy(update={"choices": [ChunkChoice(delta=DeltaMessage(role="assistant",
                                                                                          content=""))]})

            def choice(text: str, finish: FinishReason | None) -> TextChoice | ChunkChoice:
                return ChunkChoice(delta=DeltaMessage(content=text or None), finish_reason=finish)

        with chat.record:  # counts the request when the stream ends, or is cancelled as its client goes away
            if opening is not None:
                yield _event(opening)
            try:
                async for delta in self.deltas(chat):
                    usage = _usage(chat, delta.n_tokens, delta.cached_tokens) if delta.finish_reason else None
                    if delta.text or delta.finish_reason:
                        yield _event(chunk.model_copy(update={"choices": [choice(delta.text, delta.finish_reason)],
                                                              "usage": usage}))
                    if usage and request.stream_options and request.stream_options.include_usage:
                        yield _event(chunk.model_copy(update={"choices": [], "usage": usage}))
            except ExoError as e:
                chat.record.fail(e)
                yield f"data: {json.dumps(error_body(e))}\n\n"
            yield "data: [DONE]\n\n"


def _params(request: ChatCompletionRequest | CompletionRequest, prompt: list[int], context: int) -> GenerationParams:
    room = context - len(prompt)
    if room <= 0:
        raise ContextTooLong(f"The prompt is {len(prompt)} tokens long, but the context served is {context} "
                             f"tokens. Shorten the {request.prompt_field}.", param=request.prompt_field)
    limit = request.token_limit
    if limit is not None and limit > room:
        name = request.limit_name
        raise ContextTooLong(f"{name} is {limit}, but only {room} tokens are left in the context of {context} "
                             f"served after the {len(prompt)}-token prompt. Lower {name}.", param=name)
    return GenerationParams(max_tokens=limit or room, temperature=request.temperature, top_p=request.top_p,
                            seed=request.seed, stop=request.stop_list, min_p=request.min_p,
                            presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty)


def _usage(chat: PreparedChat, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(prompt_tokens=len(chat.prompt), completion_tokens=completion_tokens,
                 total_tokens=len(chat.prompt) + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def _event(chunk: ChatCompletionChunk | TextCompletion) -> str:
    return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
