"""Carries coordinator messages to peers: msgpack frames POSTed to each peer's API port."""

from __future__ import annotations

import logging

import anyio
import httpx

from exo.net.messages import CODEC
from exo.shared.types import FrozenModel, NodeId

log = logging.getLogger(__name__)

MESSAGE_PATH = "/cluster/message"
MSGPACK = "application/msgpack"


class PeerTransport:
    """Knows where peers are (seed addresses, and node ids learned from their heartbeats)."""

    def __init__(self, *, timeout: float = 1.0) -> None:
        self.seeds: set[tuple[str, int]] = set()
        self.addresses: dict[NodeId, tuple[str, int]] = {}
        self._client = httpx.AsyncClient(timeout=timeout)

    def add_seed(self, host: str, port: int) -> None:
        self.seeds.add((host, port))

    def learn(self, node_id: NodeId, host: str, port: int) -> None:
        self.addresses[node_id] = (host, port)

    def url(self, node_id: NodeId) -> str | None:
        if (address := self.addresses.get(node_id)) is None:
            return None
        host, port = address
        return f"http://{host}:{port}"

    async def send(self, to: NodeId | None, message: FrozenModel) -> None:
        """Deliver `message` to one peer, or to every known peer; failures only log (heartbeats retry)."""
        targets = set(self.addresses.values()) | self.seeds if to is None else {self.addresses.get(to)} - {None}
        frame = CODEC.encode(message)
        async with anyio.create_task_group() as tg:
            for host, port in targets:  # type: ignore[misc]
                tg.start_soon(self._post, host, port, frame)

    async def _post(self, host: str, port: int, frame: bytes) -> None:
        try:
            await self._client.post(f"http://{host}:{port}{MESSAGE_PATH}", content=frame,
                                    headers={"Content-Type": MSGPACK})
        except httpx.HTTPError as e:
            log.debug("peer %s:%d unreachable: %s", host, port, type(e).__name__)

    async def aclose(self) -> None:
        await self._client.aclose()
