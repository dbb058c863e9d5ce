"""Carries coordinator messages to peers: msgpack frames POSTed to each peer's API port, each signed with
the cluster secret when there is one (see exo/net/auth.py)."""

from __future__ import annotations

import logging

import anyio
import httpx

from exo.net.auth import HEADER, ClusterAuth, Throttle
from exo.net.messages import CODEC
from exo.shared.types import FrozenModel, NodeId

log = logging.getLogger(__name__)

MESSAGE_PATH = "/cluster/message"
MSGPACK = "application/msgpack"


class PeerTransport:
    """Knows where peers are (seed addresses, and node ids learned from their heartbeats).

    With `auth`, every frame sent is signed, and the API's /cluster/message checks peers' frames with it.
    """

    def __init__(self, *, timeout: float = 1.0, auth: ClusterAuth | None = None) -> None:
        self.seeds: set[tuple[str, int]] = set()
        self.addresses: dict[NodeId, tuple[str, int]] = {}
        self.auth = auth
        self._client = httpx.AsyncClient(timeout=timeout)
        self._refused = Throttle()

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
        headers = {"Content-Type": MSGPACK}
        if self.auth is not None:
            headers[HEADER] = self.auth.sign(frame)
        try:
            response = await self._client.post(f"http://{host}:{port}{MESSAGE_PATH}", content=frame, headers=headers)
        except httpx.HTTPError as e:
            log.debug("peer %s:%d unreachable: %s", host, port, type(e).__name__)
            return
        except Exception as e:  # an address no request can go to (an unbracketed IPv6 host, say): never stop the node
            if self._refused(f"{host}:{port}"):
                log.warning("peer %s:%s cannot be sent to: %r", host, port, e)
            return
        if response.status_code == 401 and self._refused(f"{host}:{port}"):
            log.warning("peer %s:%d refused our messages (401): %s", host, port, _reason(response))

    async def aclose(self) -> None:
        await self._client.aclose()


def _reason(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
