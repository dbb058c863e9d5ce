"""Where a node's transport sends: URLs for any host, addresses learned and forgotten, seeds kept."""

from __future__ import annotations

import pytest

from exo.net.transport import PeerTransport, http_url
from exo.shared.types import NodeId

A, B = NodeId("a"), NodeId("b")


@pytest.mark.parametrize(("host", "url"), [
    ("127.0.0.1", "http://127.0.0.1:80"), ("::1", "http://[::1]:80"), ("fe80::1%eth0", "http://[fe80::1%eth0]:80"),
    ("node-a", "http://node-a:80"),
])
def test_urls_bracket_ipv6_hosts(host: str, url: str) -> None:
    assert http_url(host, 80) == url


async def test_a_frame_to_any_node_gives_a_first_address_but_never_moves_a_known_one() -> None:
    transport = PeerTransport()
    try:
        transport.learn(A, "10.0.0.1", 1, addressed=False)
        assert transport.url(A) == "http://10.0.0.1:1"
        transport.learn(A, "10.6.6.6", 1, addressed=False)  # a frame to `*`, replayed from elsewhere
        assert transport.url(A) == "http://10.0.0.1:1"
        transport.learn(A, "10.0.0.2", 1)  # a frame that names this node: the peer moved
        assert transport.url(A) == "http://10.0.0.2:1"
    finally:
        await transport.aclose()


async def test_peers_the_coordinator_dropped_are_forgotten_and_seeds_kept() -> None:
    transport = PeerTransport()
    try:
        transport.add_seed("10.0.0.9", 9)
        transport.announce("c", "10.0.0.3", 3)
        transport.learn(A, "10.0.0.1", 1)
        transport.learn(B, "10.0.0.2", 2)
        transport.keep_only([B])
        assert transport.url(A) is None and transport.url(B) == "http://10.0.0.2:2"
        assert transport.seeds == {("10.0.0.9", 9)} and transport.announced == {"c": ("10.0.0.3", 3)}
        transport.unannounce("c")
        transport.unannounce("never-announced")
        assert transport.announced == {}
    finally:
        await transport.aclose()
