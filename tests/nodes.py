"""Real `exo` node processes for tests: started on loopback, stopped and checked for leftovers."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil

from exo.local_cluster import LocalNode, start_node, static_peers, untag, wait_for
from exo.worker.profile import free_ports
from exo.worker.runner.process import runner_pids

__all__ = ["SMALL_NODE", "RunningNode", "answers", "assert_clean_log", "free_ports", "idle_health", "node_pair",
           "orphaned_runner_pids", "runner_pids", "running_nodes", "serving_node", "sse_events", "start_node",
           "static_peers", "stop_node", "untag", "wait_for", "whole_runner_ready"]


RunningNode = LocalNode

# A node that offers little memory: the default model fits it alone, with a context of 1024 (its cache
# and as much again for the prefix cache, 94 MB of float32), and nothing more.
SMALL_NODE = ("--max-memory", "500MB", "--context", "1024")

# What no node's log may show, whatever a test stopped, killed or cut.
FORBIDDEN_IN_LOG = ("Traceback", "Queue is closed", "ClosedResourceError")


def answers(node: RunningNode, path: str = "/health") -> bool:
    try:
        return httpx.get(node.url + path, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def whole_runner_ready(node: RunningNode) -> bool:
    """The node answers, with its one runner Ready."""
    return answers(node) and httpx.get(f"{node.url}/health", timeout=5).json()["runners_ready"] == 1


def assert_clean_log(node: RunningNode, tail: int = 60) -> None:
    log = node.log.read_text(errors="replace")
    found = [word for word in FORBIDDEN_IN_LOG if word in log]
    assert not found, f"{found} in the log of node {node.host}:{node.port}:\n{node.log_tail(tail)}"


def sse_events(response: httpx.Response) -> Iterator[dict[str, Any] | str]:
    """A streamed chat's events as they arrive: each chunk decoded, and "[DONE]"."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)


@contextmanager
def serving_node(home: Path, models_dir: Path, *args: str, env: Mapping[str, str] | None = None,
                 timeout: float = 120) -> Iterator[RunningNode]:
    """A node alone (no discovery) serving the default model, or what `args` name; at the end it must stop
    with exit code 0 and a clean log."""
    node = start_node(home, models_dir, "--no-discovery", *args, env=env)
    try:
        wait_for(lambda: whole_runner_ready(node), timeout, "the node's runner to be ready")
        yield node
    finally:
        assert stop_node(node) == 0, node.log_tail(60)
        assert_clean_log(node)


async def idle_health(client: httpx.AsyncClient) -> dict[str, Any]:
    """The node's /health once nothing is running (a runner reports Ready a moment after a chat's
    last token), or as it is after 5 s."""
    for _ in range(500):
        health: dict[str, Any] = (await client.get("/health")).json()
        if not health["busy"]:
            break
        await asyncio.sleep(0.01)
    return health


def orphaned_runner_pids() -> list[int]:
    """Runners whose node is gone."""
    return [pid for pid in runner_pids() if not _node_alive(pid)]


def _node_alive(runner_pid: int) -> bool:
    try:
        node_pid = int(psutil.Process(runner_pid).cmdline()[4])
        return psutil.pid_exists(node_pid) and psutil.Process(node_pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, IndexError, ValueError):
        return True  # it exited meanwhile


def stop_node(node: RunningNode, sig: int = signal.SIGTERM) -> int:
    """Stop the node; return its exit code. Fails the test if it hangs or leaves its port taken."""
    if node.process.poll() is None:
        node.process.send_signal(sig)
        try:
            node.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()
            raise AssertionError(f"node on {node.port} ignored signal {sig} for 30 s") from None
    try:
        wait_for(lambda: not runner_pids(node.process.pid), 5, f"runners of node {node.port} to exit")
    except TimeoutError:
        raise AssertionError(f"node {node.port} left runners behind: {runner_pids(node.process.pid)}") from None
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # old connections may linger in TIME_WAIT
        try:
            s.bind(("127.0.0.1", node.port))
        except OSError:
            raise AssertionError(f"port {node.port} is still taken after the node stopped") from None
    return node.process.returncode


@contextmanager
def running_nodes(homes: list[Path], models_dir: Path, *args: str,
                  per_node: Callable[[int, list[int]], list[str]] | None = None,
                  env: dict[str, str] | None = None) -> Iterator[list[RunningNode]]:
    """Start one node per home (ports chosen first, so each may name the others), stop all after."""
    ports = free_ports(len(homes))
    nodes = [start_node(home, models_dir, *args, *(per_node(i, ports) if per_node else []), port=port, env=env)
             for i, (home, port) in enumerate(zip(homes, ports, strict=False))]
    try:
        yield nodes
    finally:
        codes, failures = [], []
        for node in nodes:  # stop every node, even when stopping one of them fails
            try:
                codes.append(stop_node(node))
            except AssertionError as e:
                failures.append(str(e))
        assert not failures, failures
        for node, code in zip(nodes, codes, strict=False):
            assert code in (0, -signal.SIGKILL), f"node {node.port} exited {code}:\n{node.log.read_text()[-3000:]}"


@contextmanager
def node_pair(homes: list[Path], models_dir: Path, *args: str,
              env: dict[str, str] | None = None) -> Iterator[list[RunningNode]]:
    """Two nodes that name each other as static peers, yielded once both answer and agree on a master."""
    with running_nodes(homes, models_dir, *args, per_node=static_peers, env=env) as nodes:
        wait_for(lambda: all(answers(n) for n in nodes), 30, "the nodes answer")
        wait_for(lambda: all(len(n.state()["nodes"]) == 2 and n.state()["masterId"] for n in nodes), 30,
                 "both nodes agree on a master")
        yield nodes
