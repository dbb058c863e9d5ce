"""Finding the other nodes of a cluster on the LAN with mDNS / DNS-SD (zeroconf).

Each node advertises `<node_id>._exo._tcp.local.` with its API port and the TXT properties
`node_id`, `cluster` and `version`, and browses for the others. Peers of another cluster and our
own service are skipped; everything else is reported through plain callbacks.

With a cluster secret, the TXT record also holds `auth`, an HMAC of (node id, cluster, API port) keyed
with the secret (exo/net/auth.py), and announcements without a valid one are ignored. This only keeps
strangers out of the list of addresses we send to: admission to the cluster rests on signed messages.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from ipaddress import IPv4Address, IPv4Interface, ip_address

import anyio
import psutil
from anyio.abc import TaskStatus
from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from exo.net.auth import ClusterAuth

SERVICE_TYPE = "_exo._tcp.local."
RESOLVE_TIMEOUT_MS = 3000
CLOSE_TIMEOUT_S = 3.0

Interfaces = InterfaceChoice | Sequence[str]  # InterfaceChoice.All, or IP addresses such as ["127.0.0.1"]

log = logging.getLogger(__name__)


def _local_ipv4() -> list[IPv4Interface]:
    return [
        IPv4Interface(f"{a.address}/{a.netmask or 32}")
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET
    ]


def pick_address(peer: list[str], local: list[IPv4Interface]) -> str | None:
    """One address to reach a peer by: first one on a subnet we share, else first routable, else any.

    Addresses we hold ourselves (a docker bridge, loopback) are only used when nothing else is left,
    since on another host they lead back to us; for a peer on this host they are all fine.
    """
    addrs = [IPv4Address(a) for a in peer]
    own = {i.ip for i in local}
    foreign = [a for a in addrs if a not in own and not a.is_loopback]
    shared = [a for a in foreign if any(a in i.network for i in local if not i.ip.is_loopback)]
    best = shared or foreign or addrs
    return str(best[0]) if best else None


@asynccontextmanager
async def _zeroconf(interfaces: Interfaces) -> AsyncIterator[AsyncZeroconf]:
    """`async with AsyncZeroconf()`, but its close (goodbyes, then sockets) also runs when cancelled:
    AsyncZeroconf's own __aexit__ awaits unshielded and would stop at the first await, leaking sockets."""
    aiozc = AsyncZeroconf(zc=Zeroconf(interfaces=interfaces, use_asyncio=True))  # never a thread of its own
    try:
        # Shielded: cancelling a task that waits for the start also cancels zeroconf's shared start
        # future, and async_close, waiting on that same future, would then fail and leave sockets open.
        with anyio.CancelScope(shield=True):
            await aiozc.zeroconf.async_wait_for_start()
        yield aiozc
    finally:
        with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True) as scope:
            await aiozc.async_close()
        if scope.cancelled_caught:
            log.warning("discovery: goodbyes took over %ss, closing sockets anyway", CLOSE_TIMEOUT_S)
            aiozc.zeroconf.close()


class Discovery:
    """Advertise this node and report peers of the same cluster as `on_peer(node_id, host, api_port)`.

    `on_peer` runs on every resolve of a peer (add and update), so it must be idempotent; it gets one
    IPv4 address per peer (see `pick_address`). `on_peer_gone(node_id)` runs when a reported peer's
    service goes away. Both run on the event loop and must not block.
    """

    def __init__(
        self,
        node_id: str,
        cluster: str,
        version: str,
        api_port: int,
        on_peer: Callable[[str, str, int], None],
        on_peer_gone: Callable[[str], None] | None = None,
        interfaces: Interfaces = InterfaceChoice.All,
        auth: ClusterAuth | None = None,
    ) -> None:
        self.node_id, self.cluster, self.version, self.api_port = node_id, cluster, version, api_port
        self.on_peer, self.on_peer_gone, self.interfaces, self.auth = on_peer, on_peer_gone, interfaces, auth
        self._refused: set[str] = set()  # node ids whose announcements had no valid proof, logged once
        self._reported: dict[str, str] = {}  # service name -> node id, of peers passed to on_peer
        self._resolving: dict[str, anyio.CancelScope] = {}  # service name -> its resolve in flight

    def _service_info(self, local: list[IPv4Interface]) -> ServiceInfo:
        if isinstance(self.interfaces, InterfaceChoice):
            addrs = [str(i.ip) for i in local if not i.ip.is_loopback] or ["127.0.0.1"]
        else:  # explicit interface addresses: advertise the IPv4 ones
            addrs = [a for a in self.interfaces if ip_address(a).version == 4]
        properties = {"node_id": self.node_id, "cluster": self.cluster, "version": self.version}
        if self.auth is not None:
            properties["auth"] = self.auth.announcement(self.node_id, self.cluster, self.api_port)
        return ServiceInfo(
            SERVICE_TYPE,
            f"{self.node_id}.{SERVICE_TYPE}",
            port=self.api_port,
            properties=properties,
            addresses=[socket.inet_aton(a) for a in addrs],
            server=f"{self.node_id}.local.",
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Registered and browsing once started; unregisters (goodbye packets) when cancelled."""
        local = _local_ipv4()
        send, receive = anyio.create_memory_object_stream[tuple[str, ServiceStateChange]](math.inf)

        # AsyncServiceBrowser fires handlers from zeroconf's loop, which `use_asyncio=True` makes ours,
        # so send_nowait is safe; unbounded because this handler must neither block nor drop, and
        # zeroconf already coalesces changes per name and packet.
        def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
            send.send_nowait((name, state_change))

        with send, receive:
            async with (
                _zeroconf(self.interfaces) as aiozc,
                anyio.create_task_group() as tg,
                AsyncServiceBrowser(aiozc.zeroconf, SERVICE_TYPE, handlers=[on_change]),
            ):
                await (await aiozc.async_register_service(self._service_info(local)))
                log.info("discovery: node=%s registered cluster=%s", self.node_id, self.cluster)
                task_status.started()
                async for name, change in receive:
                    # Resolve concurrently: a vanished service costs RESOLVE_TIMEOUT_MS and must not
                    # hold up the others. A newer change to a name supersedes its pending resolve.
                    if (pending := self._resolving.pop(name, None)) is not None:
                        pending.cancel()
                    if change is ServiceStateChange.Removed:
                        self._gone(name)
                    else:
                        self._resolving[name] = scope = anyio.CancelScope()
                        tg.start_soon(self._resolve, aiozc, name, local, scope)

    async def _resolve(
        self, aiozc: AsyncZeroconf, name: str, local: list[IPv4Interface], scope: anyio.CancelScope
    ) -> None:
        try:
            with scope:
                info = AsyncServiceInfo(SERVICE_TYPE, name)
                if await info.async_request(aiozc.zeroconf, RESOLVE_TIMEOUT_MS) and info.port is not None:
                    self._report(name, info, info.port, local)
                else:
                    log.debug("discovery: node=%s could not resolve service=%s", self.node_id, name)
        finally:
            if self._resolving.get(name) is scope:
                del self._resolving[name]

    def _report(self, name: str, info: AsyncServiceInfo, port: int, local: list[IPv4Interface]) -> None:
        props = info.decoded_properties
        node_id, cluster = props.get("node_id"), props.get("cluster")
        if node_id is None or node_id == self.node_id:
            return
        if cluster != self.cluster:
            log.debug("discovery: node=%s ignored peer=%s of cluster=%s", self.node_id, node_id, cluster)
            return
        if self.auth is not None and not self.auth.announced(props.get("auth"), node_id, cluster, port):
            if node_id not in self._refused and len(self._refused) < 1024:
                self._refused.add(node_id)
                log.warning("discovery: node=%s ignored peer=%s: its announcement has no valid proof of the "
                            "cluster secret", self.node_id, node_id)
            return
        host = pick_address(info.parsed_addresses(IPVersion.V4Only), local)
        if host is None:
            log.debug("discovery: node=%s ignored peer=%s without IPv4", self.node_id, node_id)
            return
        version = props.get("version")
        log.debug("discovery: node=%s peer=%s host=%s port=%d version=%s", self.node_id, node_id, host, port, version)
        self._reported[name] = node_id
        self.on_peer(node_id, host, port)

    def _gone(self, name: str) -> None:
        node_id = self._reported.pop(name, None)
        if node_id is not None:
            log.info("discovery: node=%s peer=%s gone", self.node_id, node_id)
            if self.on_peer_gone is not None:
                self.on_peer_gone(node_id)
