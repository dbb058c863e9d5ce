"""Carries coordinator messages to peers: msgpack frames POSTed to each peer's API port, each signed with
the cluster secret (or the API key) when there is one (see exo/net/auth.py)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import anyio
import httpx

from exo.net.auth import HEADER, ClusterAuth, Throttle
from exo.net.messages import CODEC
from exo.shared.types import FrozenModel, NodeId

log = logging.getLogger(__name__)

MESSAGE_PATH = "/cluster/message"
MSGPACK = "application/msgpack"
MAX_FRAME_BYTES = 8 << 20  # the largest frame a node sends or takes: a snapshot of a big cluster is far less
NODE_HEADER = "x-exo-node"  # on answers from /cluster/message: who is at that address, to name as receiver
_NODE_ID = re.compile(r"[\w-]{1,64}", re.ASCII)


def http_url(host: str, port: int) -> str:
    """`http://host:port`, an IPv6 host in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class PeerTransport:
    """Knows where peers are: seed addresses (`--peers`, kept; announced peers, until their announcement goes)
    and node ids learned from their heartbeats (until the coordinator drops the peer).

    With `auth`, every frame sent is signed, and the API's /cluster/message checks peers' frames with it, so
    every address learned (where forwarded requests go, with this node's API key) is one a node of the
    cluster sent from.
    """

    def __init__(self, *, timeout: float = 1.0, auth: ClusterAuth | None = None) -> None:
        self.seeds: set[tuple[str, int]] = set()  # --peers: heartbeated as long as the node runs
        self.announced: dict[str, tuple[str, int]] = {}  # node id -> address, from discovery while announced
        self.addresses: dict[NodeId, tuple[str, int]] = {}
        # Who answered at an address (NODE_HEADER): only whom frames sent there name as receiver, never
        # where requests are forwarded, since an answer proves nothing.
        self._answered: dict[tuple[str, int], str] = {}
        self.auth = auth
        self._client = httpx.AsyncClient(timeout=timeout)
        self._refused = Throttle()

    def add_seed(self, host: str, port: int) -> None:
        self.seeds.add((host, port))

    def announce(self, node_id: str, host: str, port: int) -> None:
        self.announced[node_id] = (host, port)

    def unannounce(self, node_id: str) -> None:
        self.announced.pop(node_id, None)

    def learn(self, node_id: NodeId, host: str, port: int, *, addressed: bool = True) -> None:
        """`node_id` sent from `host`. A frame that did not name this node as its receiver (see
        exo/net/auth.py) gives a node's first address, but never moves a known one."""
        if addressed or node_id not in self.addresses:
            self.addresses[node_id] = (host, port)

    def keep_only(self, node_ids: Iterable[NodeId]) -> None:
        """Forget the learned addresses of all but these peers (the coordinator's live ones); seeds stay."""
        keep = set(node_ids)
        for node_id in self.addresses.keys() - keep:
            log.debug("peer=%s at %s forgotten", node_id, self.addresses[node_id])
            del self.addresses[node_id]
        sent_to = {*self.addresses.values(), *self.seeds, *self.announced.values()}
        self._answered = {address: node for address, node in self._answered.items() if address in sent_to}

    def url(self, node_id: NodeId) -> str | None:
        if (address := self.addresses.get(node_id)) is None:
            return None
        return http_url(*address)

    async def send(self, to: NodeId | None, message: FrozenModel) -> None:
        """Deliver `message` to one peer, or to every known peer; failures only log (heartbeats retry)."""
        if to is None:
            targets = set(self.addresses.values()) | self.seeds | set(self.announced.values())
        else:
            targets = {address} if (address := self.addresses.get(to)) else set()
        frame = CODEC.encode(message)
        if len(frame) > MAX_FRAME_BYTES:
            log.error("a %s of %d bytes is over the %d a peer takes: not sent", type(message).__name__, len(frame),
                      MAX_FRAME_BYTES)
            return
        ids = {**{address: node_id for node_id, address in self.addresses.items()}, **self._answered}
        async with anyio.create_task_group() as tg:
            for host, port in targets:
                tg.start_soon(self._post, host, port, frame, ids.get((host, port)))

    async def _post(self, host: str, port: int, frame: bytes, to: str | None) -> None:
        headers = {"Content-Type": MSGPACK}
        if self.auth is not None:
            headers[HEADER] = self.auth.sign(frame, to)
        try:
            response = await self._client.post(http_url(host, port) + MESSAGE_PATH, content=frame, headers=headers)
        except httpx.HTTPError as e:
            log.debug("peer %s:%d unreachable: %s", host, port, type(e).__name__)
            return
        except Exception as e:  # an address no request can go to (a host with a space, say): never stop the node
            if self._refused(f"{host}:{port}"):
                log.warning("peer %s:%s cannot be sent to: %r", host, port, e)
            return
        if (node := response.headers.get(NODE_HEADER)) and _NODE_ID.fullmatch(node):
            self._answered[(host, port)] = node  # frames sent there from now on name it (see exo/net/auth.py)
        if response.status_code == 401 and self._refused(f"{host}:{port}"):
            log.warning("peer %s:%d refused our messages (401): %s", host, port, error_message(response))

    async def aclose(self) -> None:
        await self._client.aclose()


def error_message(response: httpx.Response) -> str:
    """The message of a peer's error answer (exo's error shape), or the start of its body."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
