"""Real zeroconf nodes in one process, advertising and browsing over multicast on 127.0.0.1.

Loopback keeps the tests off the LAN and independent of the machine's network; ids and cluster
names are unique per run so concurrent runs on one host do not see each other's nodes.
"""

from __future__ import annotations

import ipaddress
import logging
import uuid
from collections.abc import Callable, Iterator

import anyio
import psutil
import pytest
from anyio.abc import TaskGroup
from zeroconf._dns import DNSPointer  # raw records, only to fake a service that never resolves
from zeroconf._protocol.outgoing import DNSOutgoing
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
from zeroconf.const import _CLASS_IN, _FLAGS_AA, _FLAGS_QR_RESPONSE, _TYPE_PTR

from exo.net.auth import ClusterAuth
from exo.net.discovery import SERVICE_TYPE, Discovery, pick_address

RUN = uuid.uuid4().hex[:8]
CLUSTER = f"test-{RUN}"


class Peers:
    """What one node's callbacks reported: peers by API port, and node ids gone."""

    def __init__(self) -> None:
        self.ports: set[int] = set()
        self.gone: set[str] = set()

    def on_peer(self, node_id: str, host: str, port: int) -> None:
        assert ipaddress.IPv4Address(host)
        self.ports.add(port)

    def on_peer_gone(self, node_id: str) -> None:
        self.gone.add(node_id)


def node(name: str, port: int, peers: Peers, cluster: str = CLUSTER, secret: str | None = None) -> Discovery:
    return Discovery(f"{name}-{RUN}", cluster, "0.1.0", port, peers.on_peer, peers.on_peer_gone,
                     interfaces=["127.0.0.1"],
                     auth=ClusterAuth(secret, node_id=f"{name}-{RUN}", cluster=cluster) if secret else None)


async def start_all(tg: TaskGroup, *nodes: Discovery) -> None:
    """`tg.start` each node, concurrently: registering takes about 1.5 s of mDNS probing each."""
    async with anyio.create_task_group() as starting:
        for n in nodes:
            starting.start_soon(tg.start, n.run)


async def until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not condition():
            await anyio.sleep(0.05)


def mdns_sockets() -> list[object]:
    return [c for c in psutil.Process().net_connections("udp") if c.laddr and c.laddr.port == 5353]


@pytest.fixture(autouse=True)
def no_sockets_left() -> Iterator[None]:
    before = mdns_sockets()
    yield
    assert mdns_sockets() == before


async def test_two_nodes_of_one_cluster_find_each_other() -> None:
    a, b = Peers(), Peers()
    async with anyio.create_task_group() as tg:
        await start_all(tg, node("a", 1001, a), node("b", 1002, b))
        await until(lambda: a.ports == {1002} and b.ports == {1001})
        tg.cancel_scope.cancel()


async def test_three_nodes_find_each_other_and_ignore_another_cluster(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="exo.net.discovery")
    peers, outsider = [Peers(), Peers(), Peers()], Peers()
    names = ["a", "b", "c"]
    ports = {1001, 1002, 1003}

    def ignored_outsider(name: str) -> bool:
        line = f"node={name}-{RUN} ignored peer=x-{RUN} of cluster=other-{RUN}"
        return any(r.getMessage().endswith(line) for r in caplog.records)

    async with anyio.create_task_group() as tg:
        nodes = [node(n, p, ps) for n, p, ps in zip(names, sorted(ports), peers, strict=True)]
        await start_all(tg, *nodes, node("x", 1009, outsider, cluster=f"other-{RUN}"))
        await until(lambda: all(ps.ports == ports - {p} for ps, p in zip(peers, sorted(ports), strict=True)))
        await until(lambda: all(ignored_outsider(n) for n in names))
        tg.cancel_scope.cancel()
    assert all(1009 not in ps.ports for ps in peers)
    assert outsider.ports == set()


async def test_a_stopped_node_is_reported_gone() -> None:
    a, b = Peers(), Peers()
    async with anyio.create_task_group() as tg:
        await start_all(tg, node("a", 1001, a))
        async with anyio.create_task_group() as b_group:
            await start_all(b_group, node("b", 1002, b))
            await until(lambda: a.ports == {1002} and b.ports == {1001})
            b_group.cancel_scope.cancel()
        await until(lambda: a.gone == {f"b-{RUN}"})
        tg.cancel_scope.cancel()
    assert b.gone == set()


@pytest.mark.parametrize("after", [0, 0.001, 0.5])
async def test_cancelling_a_starting_node_closes_its_sockets(after: float) -> None:
    with anyio.move_on_after(after) as scope:
        async with anyio.create_task_group() as tg:
            await start_all(tg, node("a", 1001, Peers()))
    assert scope.cancelled_caught  # still probing: sockets are checked by no_sockets_left


async def test_services_that_never_resolve_do_not_hold_up_peers() -> None:
    """Pointers to nothing (as from a node that died unannounced) each cost a 3 s resolve timeout:
    resolved one after another, five of them would keep `a` from seeing `b` within the 10 s bound."""
    a, b = Peers(), Peers()
    ghosts = DNSOutgoing(_FLAGS_QR_RESPONSE | _FLAGS_AA)
    for i in range(5):
        ghosts.add_answer_at_time(
            DNSPointer(SERVICE_TYPE, _TYPE_PTR, _CLASS_IN, 120, f"ghost{i}-{RUN}.{SERVICE_TYPE}"), 0
        )
    async with AsyncZeroconf(interfaces=["127.0.0.1"]) as sender, anyio.create_task_group() as tg:
        await start_all(tg, node("a", 1001, a))
        sender.zeroconf.async_send(ghosts)
        await start_all(tg, node("b", 1002, b))
        await until(lambda: a.ports == {1002} and b.ports == {1001})
        tg.cancel_scope.cancel()


LOCAL = [ipaddress.IPv4Interface(i) for i in ("127.0.0.1/8", "192.168.1.5/24", "172.17.0.1/16")]


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        (["172.17.0.1", "192.168.1.6"], "192.168.1.6"),  # a docker bridge we share leads back to us
        (["10.0.0.7", "192.168.1.6"], "192.168.1.6"),  # a subnet we share first
        (["10.0.0.7"], "10.0.0.7"),  # else any routable address
        (["127.0.0.1", "192.168.1.5"], "127.0.0.1"),  # a peer on this host: all of them reach it
        ([], None),
    ],
)
def test_pick_address_prefers_a_shared_subnet_over_our_own_addresses(peer: list[str], expected: str | None) -> None:
    assert pick_address(peer, LOCAL) == expected


async def test_with_a_cluster_secret_announcements_without_a_valid_proof_are_ignored(
        caplog: pytest.LogCaptureFixture) -> None:
    """Each intruder is logged once per peer, and the secret itself is never announced."""
    caplog.set_level(logging.DEBUG, logger="exo.net.discovery")
    cluster, secret = f"test-auth-{RUN}", f"secret-{RUN}"
    a, b, wrong, none = Peers(), Peers(), Peers(), Peers()

    def refusals(by: str) -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and f"node={by}-{RUN} ignored peer=" in r.getMessage()]

    async with anyio.create_task_group() as tg:
        await start_all(tg, node("a", 2001, a, cluster, secret), node("b", 2002, b, cluster, secret),
                        node("wrong", 2003, wrong, cluster, "not-the-secret"), node("none", 2004, none, cluster))
        await until(lambda: a.ports == {2002} and b.ports == {2001})
        await until(lambda: all(len(refusals(n)) == 2 for n in ("a", "b")))
        # a node without a secret checks nothing, so it still sees everyone: it is the one left out
        await until(lambda: none.ports == {2001, 2002, 2003})

        async with AsyncZeroconf(interfaces=["127.0.0.1"]) as zc:  # what is on the air for node a
            info = AsyncServiceInfo(SERVICE_TYPE, f"a-{RUN}.{SERVICE_TYPE}")
            assert await info.async_request(zc.zeroconf, 3000)
            announced = info.decoded_properties
        tg.cancel_scope.cancel()

    assert a.ports == {2002} and b.ports == {2001} and wrong.ports == set()
    for by in ("a", "b"):
        assert sorted(line.split("peer=")[1].split(":")[0] for line in refusals(by)) == [f"none-{RUN}", f"wrong-{RUN}"]
    ours = ClusterAuth(secret, node_id=f"a-{RUN}", cluster=cluster)
    assert announced["auth"] == ours.announcement(f"a-{RUN}", cluster, 2001)
    assert not any(secret in str(value) for value in announced.values())
