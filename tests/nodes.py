"""Real `exo` node processes for tests: started on loopback, stopped and checked for leftovers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil


@dataclass
class RunningNode:
    process: subprocess.Popen[bytes]
    port: int
    home: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.home / "node.log"

    def state(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/state", timeout=5).json()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until `predicate` holds; return how long it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(0.1)
    return time.monotonic() - start


def answers(node: RunningNode, path: str = "/health") -> bool:
    try:
        return httpx.get(node.url + path, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


async def idle_health(client: httpx.AsyncClient) -> dict[str, Any]:
    """The node's /health once nothing is running (a runner reports Ready a moment after a chat's
    last token), or as it is after 5 s."""
    for _ in range(500):
        health: dict[str, Any] = (await client.get("/health")).json()
        if not health["busy"]:
            break
        await asyncio.sleep(0.01)
    return health


def runner_pids(node_pid: int | None = None) -> list[int]:
    """exo runner processes, of one node or of any, found by their command line
    (`python -m exo.worker.runner SPEC NODE_PID`)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmd = process.info["cmdline"] or []
        if cmd[1:3] == ["-m", "exo.worker.runner"] and (node_pid is None or cmd[4:5] == [str(node_pid)]):
            found.append(process.pid)
    return found


def orphaned_runner_pids() -> list[int]:
    """Runners whose node is gone."""
    return [pid for pid in runner_pids() if not _node_alive(pid)]


def _node_alive(runner_pid: int) -> bool:
    try:
        node_pid = int(psutil.Process(runner_pid).cmdline()[4])
        return psutil.pid_exists(node_pid) and psutil.Process(node_pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, IndexError, ValueError):
        return True  # it exited meanwhile


def start_node(home: Path, models_dir: Path, *args: str, port: int | None = None) -> RunningNode:
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "EXO_HOME": str(home), "EXO_MODELS_DIR": str(models_dir), "EXO_PEER_TIMEOUT": "2",
           "EXO_HEARTBEAT_INTERVAL": "0.25"}
    with (home / "node.log").open("ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "exo.main", "--api-host", "127.0.0.1",
                                    "--api-port", str(port), *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    return RunningNode(process, port, home)


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
                  per_node: Callable[[int, list[int]], list[str]] | None = None) -> Iterator[list[RunningNode]]:
    """Start one node per home (ports chosen first, so each may name the others), stop all after."""
    ports = [free_port() for _ in homes]
    nodes = [start_node(home, models_dir, *args, *(per_node(i, ports) if per_node else []), port=port)
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
