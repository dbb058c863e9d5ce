"""What this machine offers the cluster: its identity, memory, CPUs and accelerator."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path

import psutil

from exo import __version__, kernels
from exo.shared.state import NodeProfile
from exo.shared.types import WIRE_INT_MAX, NodeId

log = logging.getLogger(__name__)


def load_node_id(home: Path) -> NodeId:
    """A stable id for this node, kept in EXO_HOME across restarts."""
    path = home / "node_id"
    if path.is_file() and (existing := path.read_text().strip()):
        return NodeId(existing)
    home.mkdir(parents=True, exist_ok=True)
    node_id = uuid.uuid4().hex[:16]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(node_id)
    os.replace(tmp, path)
    return NodeId(node_id)


class TermStore:
    """The highest election term this node has seen, persisted so a restart never resets it."""

    def __init__(self, home: Path) -> None:
        self.path = home / "term"

    def load(self) -> int:
        """The persisted term; 0 where there is none, or (said in one line) where it cannot be read or is
        out of range: the cluster's heartbeats then bring the node to the current term."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as e:
            log.warning("term file %s unreadable (%s): starting from term 0", self.path, e)
            return 0
        try:
            term = int(text.strip())
        except ValueError:
            log.warning("term file %s holds %r, not a term: starting from term 0", self.path, text[:40])
            return 0
        if not 0 <= term <= WIRE_INT_MAX:
            log.warning("term file %s holds %.40s, outside 0..%d: starting from term 0", self.path, text.strip(),
                        WIRE_INT_MAX)
            return 0
        return term

    def save(self, term: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(str(term))
        os.replace(tmp, self.path)


def measure_profile(node_id: NodeId, *, address: str, api_port: int, memory_cap: int | None) -> NodeProfile:
    memory = psutil.virtual_memory()
    chosen = kernels.info()  # the runners, started from this node's environment, choose the same
    return NodeProfile(node_id=node_id, hostname=socket.gethostname(), version=__version__, address=address,
                       api_port=api_port, memory_total=memory.total, memory_available=memory.available,
                       memory_cap=memory_cap, cpu_count=os.cpu_count() or 1, accelerator=_accelerator(),
                       mlx_device=_mlx_device(), kernel_path=chosen.path, kernel_reason=chosen.reason)


def _accelerator() -> str:
    return "apple-gpu" if os.uname().sysname == "Darwin" else "cpu"


def _mlx_device() -> str:
    import mlx.core as mx

    return str(mx.default_device())


def ring_host(api_host: str, peers: tuple[tuple[str, int], ...] = ()) -> str:
    """The address this node's runners listen on for their ring: the API's, or where it listens on
    every address, the one this machine reaches its peers (or the internet) from."""
    if api_host not in ("0.0.0.0", "::", ""):
        return api_host
    target = peers[0][0] if peers else "192.0.2.1"  # a documentation address: nothing is sent
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((target, 9))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` different ports free on `host` right now (all held open together while they are picked)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()
