"""Real zeroconf nodes on 127.0.0.1 with a cluster secret: announcements without a valid proof of it
are ignored (and logged once per peer); the secret itself is never announced."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator

import anyio
import psutil
import pytest
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from exo.net.auth import ClusterAuth
from exo.net.discovery import SERVICE_TYPE, Discovery

RUN = uuid.uuid4().hex[:8]
CLUSTER = f"test-auth-{RUN}"
SECRET = f"secret-{RUN}"


def mdns_sockets() -> list[object]:
    return [c for c in psutil.Process().net_connections("udp") if c.laddr and c.laddr.port == 5353]


@pytest.fixture(autouse=True)
def no_sockets_left() -> Iterator[None]:
    before = mdns_sockets()
    yield
    assert mdns_sockets() == before


async def until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not condition():
            await anyio.sleep(0.05)


def node(name: str, port: int, seen: set[int], secret: str | None) -> Discovery:
    return Discovery(f"{name}-{RUN}", CLUSTER, "0.1.0", port, lambda host, port: seen.add(port),
                     interfaces=["127.0.0.1"], auth=ClusterAuth(secret) if secret else None)


async def test_announcements_without_a_valid_proof_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="exo.net.discovery")
    a, b, wrong, none = set[int](), set[int](), set[int](), set[int]()
    nodes = [node("a", 2001, a, SECRET), node("b", 2002, b, SECRET), node("wrong", 2003, wrong, "not-the-secret"),
             node("none", 2004, none, None)]

    def refusals(by: str) -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and f"node={by}-{RUN} ignored peer=" in r.getMessage()]

    async with anyio.create_task_group() as tg:
        async with anyio.create_task_group() as starting:
            for n in nodes:
                starting.start_soon(tg.start, n.run)
        await until(lambda: a == {2002} and b == {2001})
        await until(lambda: all(len(refusals(n)) == 2 for n in ("a", "b")))
        # a node without a secret checks nothing, so it still sees everyone: it is the one left out
        await until(lambda: none == {2001, 2002, 2003})

        async with AsyncZeroconf(interfaces=["127.0.0.1"]) as zc:  # what is on the air for node a
            info = AsyncServiceInfo(SERVICE_TYPE, f"a-{RUN}.{SERVICE_TYPE}")
            assert await info.async_request(zc.zeroconf, 3000)
            announced = info.decoded_properties
        tg.cancel_scope.cancel()

    assert a == {2002} and b == {2001} and wrong == set()
    for by in ("a", "b"):  # each intruder logged once
        assert sorted(line.split("peer=")[1].split(":")[0] for line in refusals(by)) == [f"none-{RUN}", f"wrong-{RUN}"]
    assert announced["auth"] == ClusterAuth(SECRET).announcement(f"a-{RUN}", CLUSTER, 2001)
    assert not any(SECRET in str(value) for value in announced.values())
