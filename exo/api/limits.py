"""Bounds on what a client may send: every string and list a request model takes has one.

The body's size is bounded first (`BodyLimitMiddleware`, `Config.max_body_bytes`); these bound its parts,
so no one field (a stop string checked at every token, a model id written to the log) costs more than
a request should.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exo.shared.types import Utf8Str

MAX_ID_CHARS = 256       # model and instance ids
MAX_MESSAGES = 1024      # messages in one chat
MAX_PARTS = 256          # text parts in one message
MAX_TEXT_CHARS = 2**22   # one message's text (the body limit and the model's context bind sooner)
MAX_STOPS = 4            # as OpenAI
MAX_STOP_CHARS = 256     # each stop string is checked against the tail of the text at every token
MAX_SHARDS = 256         # nodes one instance spans


def _printable(text: str) -> str:
    if not text.isprintable():
        raise ValueError("must hold printable characters only (no newlines or other control characters)")
    return text


# An id that names a model: logged, shown and sent on, so no line breaks or control characters.
ModelIdStr = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS), AfterValidator(_printable)]
Text = Annotated[Utf8Str, Field(max_length=MAX_TEXT_CHARS)]


def bounded_stops(stops: list[str]) -> list[str]:
    """At most MAX_STOPS stop strings of at most MAX_STOP_CHARS each, whichever API names them."""
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop sequences are allowed")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(f"a stop sequence may be at most {MAX_STOP_CHARS} characters long")
    return stops


Stops = Annotated[list[Utf8Str], AfterValidator(bounded_stops)]


class _TooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is over this node's limit of {limit} bytes (max_body_bytes); "
                              "send less.")


class BodyLimitMiddleware:
    """Refuses a request body over `limit` bytes with 413: from its Content-Length before reading any of
    it, or, for a chunked body, as soon as what arrived passes the limit. Paths in `exempt` keep limits
    of their own (peers' frames: exo/api/cluster.py)."""

    def __init__(self, app: ASGIApp, limit: int, exempt: frozenset[str] = frozenset()) -> None:
        self.app, self.limit, self.exempt = app, limit, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            await self._refuse(scope, receive, send)
            return
        received, started = 0, False

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _TooLarge(self.limit)  # FastAPI's handlers answer it, in the error shape
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except _TooLarge:  # read outside a route (by another middleware): answered here
            if started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = _TooLarge(self.limit)
        body = {"error": {"message": error.detail, "type": "invalid_request_error", "param": None,
                          "code": "body_too_large"}}
        await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)
