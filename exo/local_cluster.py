"""Real `exo` nodes on this machine's loopback, for `exo bench-cluster` and the tests.

Each node is its own process (in its own session, so a Ctrl-C reaches only the caller, which then
stops the nodes) with its own EXO_HOME and log, sharing one model cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from exo.shared.runners import RunnerStatus
from exo.worker.profile import free_ports

# Quick failure detection, so tests and benchmarks do not wait on timeouts meant for real networks.
NODE_ENV = {"EXO_PEER_TIMEOUT": "2", "EXO_HEARTBEAT_INTERVAL": "0.25"}


@dataclass
class LocalNode:
    process: subprocess.Popen[bytes]
    port: int
    home: Path
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log(self) -> Path:
        return self.home / "node.log"

    def state(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/state", timeout=5).json()

    def log_tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(f"  {line}" for line in lines[-n:])


def start_node(home: Path, models_dir: Path, *args: str, port: int | None = None,
               env: Mapping[str, str] | None = None, host: str = "127.0.0.1",
               prefix: Sequence[str] = ()) -> LocalNode:
    """An `exo` node on `host`, logging to `home/node.log` (`env` adds to its environment). `prefix` runs
    it through another command that then execs it, such as `ip netns exec NAME`, so its pid stays the node's."""
    [port] = [port] if port else free_ports(1)
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **NODE_ENV, "EXO_HOME": str(home), "EXO_MODELS_DIR": str(models_dir), **(env or {})}
    cmd = [*prefix, sys.executable, "-m", "exo.main", "--api-host", host, "--api-port", str(port), *args]
    with (home / "node.log").open("ab") as out:
        process = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return LocalNode(process, port, home, host)


def static_peers(i: int, ports: Sequence[int], hosts: Sequence[str] | None = None) -> list[str]:
    """Flags for node `i` of nodes on `ports` (at `hosts`, default all on 127.0.0.1) to find the others
    without mDNS."""
    hosts = hosts or ["127.0.0.1"] * len(ports)
    return ["--no-discovery", "--peers",
            ",".join(f"{h}:{p}" for j, (h, p) in enumerate(zip(hosts, ports, strict=True)) if j != i)]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until `predicate` holds; return how long it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.1)
    return time.monotonic() - start


def untag(instance: Mapping[str, Any]) -> dict[str, Any]:
    """The body of an instance as /state and /instance show it, tagged by its kind: `{"CpuRingInstance": {...}}`."""
    [body] = instance.values()
    return dict(body)


def place(cluster: Sequence[LocalNode], nodes: Sequence[LocalNode], model_id: str,
          layers: Sequence[tuple[int, int]], timeout: float = 240.0) -> str:
    """Place `model_id` with rank i on `nodes[i]` holding `layers[i]`, and wait until every node of
    `cluster` sees every runner Ready; the instance's id. Raises RuntimeError if a runner fails."""
    node_ids = [node.state()["nodeId"] for node in nodes]
    shards = [{"nodeId": node_id, "rank": rank, "start": start, "end": end}
              for rank, (node_id, (start, end)) in enumerate(zip(node_ids, layers, strict=True))]
    # through the cluster's last node, which may hold no shard: any node hands it to the master
    answer = httpx.post(f"{cluster[-1].url}/instance", json={"modelId": model_id, "shards": shards}, timeout=15)
    if answer.status_code != 200:
        raise RuntimeError(f"POST /instance answered {answer.status_code}: {answer.text[:500]}")
    instance_id: str = untag(answer.json())["instanceId"]

    def ready(node: LocalNode) -> bool:
        runners = node.state()["runners"]
        if failed := [r for r in runners.values()
                      if r["instanceId"] == instance_id and r["status"] == RunnerStatus.FAILED]:
            raise RuntimeError(f"runner {instance_id}.{failed[0]['rank']} failed: {failed[0].get('error')}")
        return all(runners.get(f"{instance_id}.{rank}", {}).get("status") == RunnerStatus.READY
                   for rank in range(len(nodes)))

    wait_for(lambda: all(ready(node) for node in cluster), timeout,
             f"every node to see the {len(nodes)} runners of {model_id} Ready")
    return instance_id
