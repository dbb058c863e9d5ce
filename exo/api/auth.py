"""The API key: with one set (`--api-key`), every endpoint but `GET /health` and the dashboard (its page and
the static files under /dashboard/, which hold no data and must load to ask for the key) asks for
`Authorization: Bearer <key>`, and answers 401 in OpenAI's error shape without it.

`/cluster/message` and `/cluster/models/` are not the API's: peers' frames and model requests there prove
the cluster secret instead, or where a node has none, the API key, by a MAC keyed with it
(exo/net/auth.py); the key itself is never sent there.
All nodes of a cluster are configured with the same key: a node handing a request to another (a master
command, a chat to the node that serves it) sends its own key along, through `forward_headers()`, and only
to addresses learned from frames that proved the key or the secret (exo/net/transport.py).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from exo.net.transport import MESSAGE_PATH

PUBLIC = {("GET", "/health"), ("HEAD", "/health"), ("GET", "/"), ("HEAD", "/"), ("POST", MESSAGE_PATH)}
# GET and HEAD only: the dashboard's static files, and peers' model requests (which prove the cluster secret)
PUBLIC_PREFIXES = ("/dashboard/", "/cluster/models/")

# The key this node sends to others. Node-to-node calls happen deep in handlers and in the preload task;
# a context variable, set per request by the middleware, carries it there without a global.
_own_key: ContextVar[str | None] = ContextVar("exo_api_key", default=None)


def unauthorized(message: str, code: str, *, scheme: str = "Bearer") -> JSONResponse:
    """A 401 with OpenAI's error body (what OpenAI answers for a missing or wrong key)."""
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": scheme})


def forward_headers() -> dict[str, str]:
    """Headers that let another node of this cluster take a request from this one."""
    key = _own_key.get()
    return {"Authorization": f"Bearer {key}"} if key else {}


@contextmanager
def sending_api_key(key: str | None) -> Iterator[None]:
    """Node-to-node calls made inside send `key` (for work outside a request, like preloading)."""
    token = _own_key.set(key)
    try:
        yield
    finally:
        _own_key.reset(token)


class ApiKeyMiddleware:
    """A pure ASGI middleware: the key is checked before any route runs, streaming ones included."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        if not api_key:
            raise ValueError("the API key is empty")
        self.app, self._key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        with sending_api_key(self._key.decode()):
            if _public(scope) or self._holds_key(scope):
                await self.app(scope, receive, send)
            elif scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                has_header = any(name in (b"authorization", b"x-api-key") for name, _ in scope["headers"])
                response = (unauthorized("The API key is not valid for this node.", "invalid_api_key") if has_header
                            else unauthorized("This node requires an API key: send `Authorization: Bearer <key>` "
                                              "with the key the node was started with (--api-key).",
                                              "missing_api_key"))
                await response(scope, receive, send)

    def _holds_key(self, scope: Scope) -> bool:
        """`Authorization: Bearer <key>`, or `x-api-key: <key>` as Anthropic's clients send it."""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key):
                    return True
            elif name == b"x-api-key" and hmac.compare_digest(value.strip(), self._key):
                return True
        return False


def _public(scope: Scope) -> bool:
    method, path = scope.get("method"), scope["path"]
    return (method, path) in PUBLIC or (method in ("GET", "HEAD") and path.startswith(PUBLIC_PREFIXES))
