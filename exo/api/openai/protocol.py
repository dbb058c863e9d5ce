"""Request and response bodies of the OpenAI-compatible chat and text completion APIs."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from exo.api.limits import MAX_MESSAGES, MAX_PARTS, ModelIdStr, Text, bounded_stops
from exo.engine.generate import FinishReason
from exo.models.catalog import ModelInfo
from exo.shared.types import Utf8Str


class _Request(BaseModel):
    # Clients send fields this server does not use (user, logprobs=false, ...); accept and ignore them.
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_PARTS)] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Request):
    include_usage: bool = False


class _GenerationRequest(_Request):
    """What chat and text completions share: the model, how to sample, when to stop, how to answer."""

    model: ModelIdStr | None = None  # None: the one model the cluster serves, if it serves only one
    max_tokens: int | None = Field(default=None, ge=1, lt=2**31)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)  # as llama.cpp's and vLLM's servers take it
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, lt=2**64)  # the sampler's key is an unsigned 64-bit int
    stop: Utf8Str | list[Utf8Str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        bounded_stops([stop] if isinstance(stop, str) else stop or [])
        return stop

    @property
    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def limit_name(self) -> str:
        return "max_tokens"


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, lt=2**31)
    prompt_field: ClassVar[str] = "messages"  # the field a prompt too long for the model is blamed on

    @property
    def prompt_chars(self) -> int:
        return sum(len(m.text) for m in self.messages)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def limit_name(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"


class CompletionRequest(_GenerationRequest):
    """OpenAI's (legacy) text completion: the model continues `prompt` as it is, with no chat template."""

    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)]
    max_tokens: int | None = Field(default=16, ge=1, lt=2**31)  # OpenAI's default for this endpoint
    echo: Literal[False] = False
    best_of: Literal[1] = 1
    prompt_field: ClassVar[str] = "prompt"

    @property
    def prompt_chars(self) -> int:
        return len(self.text)

    @property
    def text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # the prompt's tokens whose key/values the instance kept from an earlier request


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class TextChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class TextCompletion(BaseModel):
    """A text completion, and each chunk of a streamed one (which carries its usage only at the end)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


def completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
