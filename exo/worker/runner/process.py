"""How a runner process is started and found again: `python -m exo.worker.runner SPEC NODE_PID`.

The command line is the runner's marker: the node's pid in it tells whose runner it is, so tools
find exo's runners (and orphans whose node is gone) without matching on loose names.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import psutil

MODULE = "exo.worker.runner"
# A runner talks to its node over a pipe and to its ring over sockets: it needs neither secret.
NODE_ONLY_ENV = ("EXO_API_KEY", "EXO_CLUSTER_SECRET", "EXO_CLUSTER_SECRET_FILE")


def command(spec_json: str, node_pid: int) -> list[str]:
    return [sys.executable, "-m", MODULE, spec_json, str(node_pid)]


def runner_env(env: Mapping[str, str]) -> dict[str, str]:
    """The node's environment less what only the node needs."""
    return {k: v for k, v in env.items() if k not in NODE_ONLY_ENV}


def runner_pids(node_pid: int | None = None) -> list[int]:
    """exo's runner processes on this machine: one node's, or every node's."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmd = process.info["cmdline"] or []
        if cmd[1:3] == ["-m", MODULE] and (node_pid is None or cmd[4:5] == [str(node_pid)]):
            found.append(process.pid)
    return found
