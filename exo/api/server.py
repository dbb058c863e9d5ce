"""The HTTP server's guard against clients that hold connections: uvicorn's h11 protocol with a deadline
for each request and a bound on open connections.

uvicorn times out only idle keep-alive connections, after a response: a client that opens a connection
and sends a request slowly, or never finishes it (slowloris), holds it forever. Here each request has
`request_timeout` seconds from its first byte (or the connection's start) to arrive whole, and a new
connection beyond `max_connections` first closes the oldest one that is not in a request; only when
every connection is serving one is the new one refused. Errors are in the API's error shape.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from exo.api.errors import RETRY_AFTER_SECONDS

BAD_REQUEST = "Invalid HTTP request: its request line or headers are malformed, or longer than 16 KiB."


class GuardedH11Protocol(H11Protocol):
    max_connections = 512
    request_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None  # for the request now arriving
        self._since = 0.0  # when that request's time began

    @classmethod
    def with_limits(cls, max_connections: int, request_timeout: float) -> type[GuardedH11Protocol]:
        return type(cls.__name__, (cls,), {"max_connections": max_connections, "request_timeout": request_timeout})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()
        if len(self.connections) > self.max_connections and not self._evict_one():
            self._answer(503, "service_unavailable", "This node has too many open connections; retry shortly.",
                         "too_many_connections", retry=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._disarm_once_received()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets its own deadline
            self._disarm_once_received()

    def send_400_response(self, msg: str) -> None:
        self._answer(400, "invalid_request_error", BAD_REQUEST, "invalid_http_request")

    def _waiting(self) -> bool:
        """Whether this connection holds no request being served: idle, or one not yet whole."""
        return self.cycle is None or self.cycle.response_complete or self.conn.their_state is h11.SEND_BODY

    def _evict_one(self) -> bool:
        others = [c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol)
                  and c._deadline is not None and c._waiting()]
        if not others:
            return False
        oldest = min(others, key=lambda c: c._since)
        oldest._close()
        return True

    def _arm(self) -> None:
        self._disarm()
        self._since = time.monotonic()
        self._deadline = self.loop.call_later(self.request_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _disarm_once_received(self) -> None:
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()  # the request is all here; its answer may take as long as it takes

    def _timed_out(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
            self._answer(408, "invalid_request_error", f"The request did not arrive within {self.request_timeout:g}s.",
                         "request_timeout")
        else:
            self._close()  # half a body: the route reading it sees the client go

    def _close(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.close()

    def _answer(self, status: int, error_type: str, message: str, code: str, retry: bool = False) -> None:
        """Answer outside any request (h11 can only answer one it has read) and close the connection."""
        if self.transport.is_closing():
            return
        body = json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}}).encode()
        headers: list[tuple[str, Any]] = [("content-type", "application/json"), ("content-length", len(body)),
                                          ("connection", "close")]
        if retry:
            headers.append(("retry-after", RETRY_AFTER_SECONDS))
        head = f"HTTP/1.1 {status} {_REASONS[status]}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        self.transport.write(head.encode() + body)
        self._close()


_REASONS = {400: "Bad Request", 408: "Request Timeout", 503: "Service Unavailable"}
