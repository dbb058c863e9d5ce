"""Real nodes on loopback, attacked as an intruder on the LAN would (issue 12): forged and oversized cluster
frames, a forged master that wants the API key, and the addresses a node keeps sending to.

`Listener` stands in for an attacker's port, or for a port a node once heard of: it records every
request that reaches it.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from nodes import SMALL_NODE, RunningNode, free_ports, running_nodes, start_node, stop_node, wait_for

from exo import __version__
from exo.local_cluster import NODE_ENV
from exo.net.auth import HEADER
from exo.net.codec import WIRE_VERSION
from exo.net.transport import MAX_FRAME_BYTES, MESSAGE_PATH, MSGPACK, http_url
from exo.shared.types import WIRE_INT_MAX

pytestmark = pytest.mark.slow

KEY, SECRET = "sk-the-api-key-of-this-test", "the-cluster-secret-of-this-test"
HEARTBEAT = float(NODE_ENV["EXO_HEARTBEAT_INTERVAL"])
ALONE = ("--no-preload", "--no-discovery", *SMALL_NODE)


class Listener:
    """A TCP port on loopback that answers every HTTP request 204 and keeps each request's head."""

    def __init__(self, port: int | None = None) -> None:
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", port or 0))
        self.socket.listen(64)
        self.socket.settimeout(0.2)
        self.port: int = self.socket.getsockname()[1]
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.socket.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    head = conn.recv(65536)
                    self.requests.append(head)
                    conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    listening = Listener()
    try:
        yield listening
    finally:
        listening.close()


def profile(node_id: str, api_port: int) -> dict[str, Any]:
    return {"node_id": node_id, "hostname": "intruder", "version": __version__, "address": "127.0.0.1",
            "api_port": api_port, "memory_total": 64 << 30, "memory_available": 60 << 30, "memory_cap": None,
            "cpu_count": 8, "accelerator": "cpu", "mlx_device": "cpu", "mode": "normal"}


def heartbeat(node_id: str, api_port: int, *, cluster: str = "exo", **fields: Any) -> dict[str, Any]:
    return {"cluster": cluster, "version": __version__, "profile": profile(node_id, api_port), "term": 0,
            "master_id": None, "synced_term": -1, "last_event_index": -1, "runners": [], "tasks": [], "queues": {},
            **fields}


def frame(tag: str, body: dict[str, Any]) -> bytes:
    """A frame as an intruder packs it: msgpack by hand, no model in the way."""
    return msgpack.packb({"v": WIRE_VERSION, "t": tag, "d": body})


def post(url: str, content: bytes, **headers: str) -> httpx.Response:
    return httpx.post(url + MESSAGE_PATH, content=content, headers={"Content-Type": MSGPACK, **headers}, timeout=10)


def get(node: RunningNode, path: str, key: str | None = None, url: str | None = None) -> httpx.Response:
    return httpx.get((url or node.url) + path, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=5)


def is_master(node: RunningNode, key: str | None = None, url: str | None = None) -> bool:
    try:
        return bool(get(node, "/state", key, url).json()["isMaster"])
    except httpx.HTTPError:
        return False


def agreed(nodes: list[RunningNode], key: str | None = None, urls: list[str] | None = None) -> bool:
    try:
        states = [get(node, "/state", key, url).json() for node, url in zip(nodes, urls or [None] * len(nodes),
                                                                              strict=True)]
    except httpx.HTTPError:
        return False
    views = {(s["masterId"], s["term"], frozenset(s["nodes"])) for s in states}
    return len(views) == 1 and states[0]["masterId"] is not None and len(states[0]["nodes"]) == len(nodes)


def raw_request(port: int, head: bytes, timeout: float = 5.0) -> bytes:
    """Send a request head (and no body) on a raw socket; what the node answers before the body comes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        answer = b""
        while b"\r\n\r\n" not in answer:
            if not (piece := s.recv(65536)):
                break
            answer += piece
        return answer


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:300])
    error: dict[str, Any] = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"]
    return error


# -- item 1: integers off the wire are bounded -------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("term", 2**64 - 1), ("term", WIRE_INT_MAX + 1), ("last_event_index", 2**63 - 1), ("synced_term", -2),
    ("profile.memory_total", 2**64 - 1), ("queues", {"i": 2**64 - 1}),
])
def test_a_heartbeat_with_an_integer_out_of_bounds_is_refused_and_nothing_persisted(
        tmp_path: Path, models_dir: Path, field: str, value: Any) -> None:
    # Regression: term 2**64-1 made the node claim 2**64, which msgpack cannot encode: the send loop's
    # exception ended the node, and the persisted term made every restart die the same way.
    node = start_node(tmp_path / "n", models_dir, *ALONE)
    try:
        wait_for(lambda: is_master(node), 30, "the node to elect itself")
        body = heartbeat("intruder", node.port)
        if "." in field:
            outer, inner = field.split(".")
            body[outer][inner] = value
        else:
            body[field] = value
        error = assert_error(post(node.url, frame("Heartbeat", body)), 400)
        assert "invalid Heartbeat" in error["message"]
        time.sleep(4 * HEARTBEAT)
        assert get(node, "/health").status_code == 200
        seen = get(node, "/state").json()
        assert "intruder" not in seen["nodes"] and "intruder" not in seen["peers"] and seen["term"] == 1
        assert (tmp_path / "n" / "term").read_text() == "1"
    finally:
        assert stop_node(node) == 0, node.log.read_text()[-3000:]
    again = start_node(tmp_path / "n", models_dir, *ALONE, port=node.port)
    try:
        wait_for(lambda: is_master(again), 30, "the restarted node to elect itself")
        assert get(again, "/state").json()["term"] == 2
    finally:
        assert stop_node(again) == 0, again.log.read_text()[-3000:]


def test_a_heartbeat_at_the_greatest_term_leaves_the_node_serving(tmp_path: Path, models_dir: Path,
                                                                   listener: Listener) -> None:
    node = start_node(tmp_path / "n", models_dir, *ALONE)
    try:
        wait_for(lambda: is_master(node), 30, "the node to elect itself")
        body = heartbeat("intruder", listener.port, term=WIRE_INT_MAX, synced_term=WIRE_INT_MAX,
                         last_event_index=WIRE_INT_MAX)
        assert post(node.url, frame("Heartbeat", body)).status_code == 204
        wait_for(lambda: get(node, "/state").json()["term"] == WIRE_INT_MAX, 10, "the node to claim past it")
        time.sleep(4 * HEARTBEAT)
        assert get(node, "/health").status_code == 200
    finally:
        assert stop_node(node) == 0, node.log.read_text()[-3000:]


@pytest.mark.parametrize("persisted", [str(2**64), "-3", "not a term", "9" * 5000, "\xff\xfe"])
def test_a_persisted_term_out_of_range_or_unreadable_is_reported_and_the_node_starts(
        tmp_path: Path, models_dir: Path, persisted: str) -> None:
    home = tmp_path / "n"
    home.mkdir()
    (home / "term").write_bytes(persisted.encode("latin-1"))
    node = start_node(home, models_dir, *ALONE)
    try:
        wait_for(lambda: is_master(node), 30, "the node to elect itself")
        assert get(node, "/state").json()["term"] == 1
        reported = [line for line in node.log.read_text().splitlines() if "term file" in line]
        assert len(reported) == 1 and "starting from term 0" in reported[0], reported
        assert "Traceback" not in node.log.read_text()
    finally:
        assert stop_node(node) == 0, node.log.read_text()[-3000:]


# -- item 4: a frame's size and proof are checked before it is read ------------------------------------


def test_an_oversized_cluster_frame_is_refused_before_its_body_is_read(tmp_path: Path, models_dir: Path) -> None:
    node = start_node(tmp_path / "n", models_dir, *ALONE, "--cluster-secret", SECRET)
    try:
        wait_for(lambda: is_master(node), 30, "the node to elect itself")
        # a declared gigabyte is answered at once, without a byte of it sent
        answer = raw_request(node.port, f"POST {MESSAGE_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: {MSGPACK}\r\n"
                                        f"Content-Length: {1 << 30}\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        # so is a proof that cannot be one, before the body
        answer = raw_request(node.port, f"POST {MESSAGE_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: {MSGPACK}\r\n"
                                        f"{HEADER}: garbage\r\nContent-Length: 1000\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]

        # a body streamed without a length is cut off past the cap
        def chunks() -> Iterator[bytes]:
            for _ in range(4 * MAX_FRAME_BYTES // (1 << 20)):
                yield b"\x00" * (1 << 20)

        try:
            response = httpx.post(node.url + MESSAGE_PATH, content=chunks(), timeout=30,
                                  headers={"Content-Type": MSGPACK, HEADER: f"{int(time.time() * 1000)}."
                                           f"{'0' * 16}.a.*.{'0' * 64}"})
            assert_error(response, 413)
        except httpx.WriteError:
            pass  # the node closed the connection on the rest of the body: refused as well
        assert get(node, "/health").status_code == 200
    finally:
        assert stop_node(node) == 0, node.log.read_text()[-3000:]


# -- item 9: an API key without a cluster secret ---------------------------------------------------------


def test_a_forged_master_heartbeat_never_gets_a_key_only_nodes_api_key(tmp_path: Path, models_dir: Path,
                                                                       listener: Listener) -> None:
    # Regression: /cluster/message was open on a key-only node, so a forged master's heartbeat made it
    # forward its clients' requests, Authorization header included, to the forger's port.
    node = start_node(tmp_path / "n", models_dir, *ALONE, "--api-key", KEY)
    try:
        wait_for(lambda: is_master(node, KEY), 30, "the node to elect itself")
        forged = heartbeat("forger", listener.port, term=50, master_id="forger", synced_term=50, last_event_index=0)
        assert_error(post(node.url, frame("Heartbeat", forged)), 401)
        assert_error(post(node.url, frame("Heartbeat", forged), **{HEADER: "1.0123456789abcdef.a.*." + "0" * 64}), 401)
        # a browser's form post is not a cluster message, whatever it holds
        form = httpx.post(node.url + MESSAGE_PATH, content=frame("Heartbeat", forged), timeout=5,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert_error(form, 415)
        time.sleep(4 * HEARTBEAT)

        placed = httpx.post(f"{node.url}/place_instance", json={"model_id": "x", "min_nodes": 3},
                            headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert placed.status_code in (404, 409), placed.text  # the node's own answer: it is still the master
        assert is_master(node, KEY) and get(node, "/state", KEY).json()["term"] == 1
        assert not any(b"authorization" in request.lower() for request in listener.requests), listener.requests
        assert not listener.requests
        said = [line for line in node.log.read_text().splitlines() if "an API key but no cluster secret" in line]
        assert len(said) == 1 and "can join this cluster" in said[0]
    finally:
        assert stop_node(node) == 0, node.log.read_text()[-3000:]


def test_key_only_nodes_prove_the_key_to_each_other_and_forward_with_it(tmp_path: Path, models_dir: Path) -> None:
    def flags(i: int, ports: list[int]) -> list[str]:
        return ["--no-discovery", "--peers", ",".join(f"127.0.0.1:{p}" for j, p in enumerate(ports) if j != i),
                "--api-key", KEY if i < 2 else "sk-another-key-of-this-test"]

    homes = [tmp_path / name for name in ("a", "b", "other")]
    with running_nodes(homes, models_dir, "--no-preload", *SMALL_NODE, per_node=flags) as nodes:
        good, other = nodes[:2], nodes[2]
        wait_for(lambda: agreed(good, KEY), 30, "the two nodes with one key agree")
        time.sleep(8 * HEARTBEAT)
        assert len(get(good[0], "/state", KEY).json()["nodes"]) == 2  # the node with another key never joins
        assert len(get(other, "/state", "sk-another-key-of-this-test").json()["nodes"]) == 1
        assert "refused our messages (401)" in other.log.read_text()
        follower = next(node for node in good if not is_master(node, KEY))
        forwarded = httpx.post(f"{follower.url}/place_instance", json={"model_id": "x", "min_nodes": 3},
                               headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert forwarded.status_code in (404, 409), forwarded.text  # the master's own answer came back


# -- item 17: IPv6 peers ----------------------------------------------------------------------------------


def test_nodes_on_ipv6_loopback_form_a_cluster_and_forward(tmp_path: Path, models_dir: Path) -> None:
    # Regression: an IPv6 peer's address went into URLs unbracketed, so no message ever reached it.
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    ports = free_ports(2)
    nodes = [start_node(tmp_path / f"n{i}", models_dir, "--no-preload", "--no-discovery", *SMALL_NODE,
                        "--peers", f"[::1]:{ports[1 - i]}", port=ports[i], host="::1") for i in range(2)]
    urls = [http_url("::1", port) for port in ports]
    try:
        wait_for(lambda: agreed(nodes, urls=urls), 30, "two nodes on ::1 agree")
        follower = next(url for node, url in zip(nodes, urls, strict=True) if not is_master(node, url=url))
        forwarded = httpx.post(f"{follower}/place_instance", json={"model_id": "x", "min_nodes": 3}, timeout=10)
        assert forwarded.status_code in (404, 409), forwarded.text
    finally:
        for node in nodes:
            assert stop_node(node) == 0, node.log.read_text()[-3000:]


# -- item 18: a node sends only to peers it has now, and to its --peers ------------------------------------


def test_a_node_stops_sending_to_a_peer_that_left_but_keeps_its_static_peers(tmp_path: Path, models_dir: Path,
                                                                             listener: Listener) -> None:
    # Regression: the transport's addresses only grew, so heartbeats went to every peer ever seen.
    a_port, c_port = free_ports(2)
    a = start_node(tmp_path / "a", models_dir, *ALONE[:2], "--peers", f"127.0.0.1:{listener.port}", port=a_port)
    c = start_node(tmp_path / "c", models_dir, *ALONE[:2], "--peers", f"127.0.0.1:{a_port}", port=c_port)
    try:
        wait_for(lambda: agreed([a, c]), 30, "a and c agree")
    finally:
        assert stop_node(c) == 0, c.log.read_text()[-3000:]
    try:
        wait_for(lambda: len(get(a, "/state").json()["peers"]) == 0, 10, "a to drop c")
        gone = Listener(c_port)  # c's port, now nobody's
        try:
            listener.requests.clear()
            time.sleep(8 * HEARTBEAT)
            assert not gone.requests, gone.requests[:1]
            assert any(MESSAGE_PATH.encode() in r for r in listener.requests)  # the static peer is still heartbeated
        finally:
            gone.close()
    finally:
        assert stop_node(a) == 0, a.log.read_text()[-3000:]


def test_a_node_stops_sending_to_an_announced_peer_once_it_is_gone(tmp_path: Path, models_dir: Path) -> None:
    # Regression: Discovery.on_peer_gone was never wired, so announced peers stayed seeds forever.
    cluster = f"hostile-{uuid.uuid4().hex[:8]}"
    a = start_node(tmp_path / "a", models_dir, "--no-preload", "--cluster", cluster)
    b = start_node(tmp_path / "b", models_dir, "--no-preload", "--cluster", cluster)
    try:
        wait_for(lambda: agreed([a, b]), 30, "a and b find each other")
    finally:
        assert stop_node(b) == 0, b.log.read_text()[-3000:]
    try:
        wait_for(lambda: len(get(a, "/state").json()["peers"]) == 0, 10, "a to drop b")
        wait_for(lambda: f"discovery: node={get(a, '/node_id').json()} peer=" in a.log.read_text()
                 and " gone" in a.log.read_text(), 15, "a to hear b's goodbye")
        gone = Listener(b.port)
        try:
            time.sleep(8 * HEARTBEAT)
            assert not gone.requests, gone.requests[:1]
        finally:
            gone.close()
    finally:
        assert stop_node(a) == 0, a.log.read_text()[-3000:]


def test_a_peer_back_at_a_new_address_is_heard_again(tmp_path: Path, models_dir: Path) -> None:
    # Frames to an address whose node the sender does not know name no receiver, and those may not move
    # a known peer's address (they could be replayed). The receiver's answer names it, so the sender's
    # next frames do, and move it.
    b = start_node(tmp_path / "b", models_dir, *ALONE[:2], "--cluster-secret", SECRET,
                   env={"EXO_PEER_TIMEOUT": "20"})  # long enough to outlast a's restart; b may claim after 10 s
    a = start_node(tmp_path / "a", models_dir, *ALONE[:2], "--cluster-secret", SECRET,
                   "--peers", f"127.0.0.1:{b.port}")
    try:
        wait_for(lambda: agreed([a, b]), 40, "a and b agree")
        assert stop_node(a, signal.SIGKILL) == -signal.SIGKILL  # no goodbye: b keeps a's address
        a = start_node(tmp_path / "a", models_dir, *ALONE[:2], "--cluster-secret", SECRET, "--peers",
                       f"127.0.0.1:{b.port}")  # on another port
        wait_for(lambda: agreed([a, b]), 30, "a and b agree again, a hearing b")
    finally:
        for node in (a, b):
            assert stop_node(node) == 0, node.log.read_text()[-3000:]
