"""exo's processes on this machine, found by their markers only, and the orphaned runners among them.

A node is `python -m exo.main` or the `exo` script with no tool command (`exo doctor`, `exo bench`,
... are not nodes). A runner is `python -m exo.worker.runner SPEC NODE_PID`. A runner belongs to
the node named by NODE_PID only if that process is alive, is a node, and is the runner's parent:
otherwise the node that started it is gone (the pid may since have been reused), and the runner is
an orphan, holding memory and ports that nothing will ever give back.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from exo.doctor.report import NodeProcess, OrphanedRunner, RunnerProcess
from exo.doctor.secrets import redact_args
from exo.worker.runner.process import MODULE as RUNNER_MODULE

MDNS_PORT = 5353
_GONE_STATUSES = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


@dataclass(frozen=True)
class Proc:
    """What classifying a process needs; `create_time` tells a process from a later one with its pid."""

    pid: int
    ppid: int
    cmdline: tuple[str, ...]
    rss: int = 0
    create_time: float = 0.0


def snapshot() -> list[Proc]:
    procs = []
    for p in psutil.process_iter(["ppid", "cmdline", "memory_info", "create_time", "status"]):
        info = p.info
        if info["cmdline"] and info["status"] not in _GONE_STATUSES:
            rss = info["memory_info"].rss if info["memory_info"] else 0
            procs.append(Proc(p.pid, info["ppid"] or 0, tuple(info["cmdline"]), rss, info["create_time"] or 0.0))
    return procs


def node_args(cmdline: Sequence[str]) -> tuple[str, ...] | None:
    """A node's flags if `cmdline` runs exo's main (as a module, a file or the `exo` script), else None."""
    if list(cmdline[1:3]) == ["-m", "exo.main"]:
        return tuple(cmdline[3:])
    if len(cmdline) > 1 and Path(cmdline[0]).name.startswith("python") and (
            Path(cmdline[1]).name == "exo" or cmdline[1].endswith("exo/main.py")):
        return tuple(cmdline[2:])
    if cmdline and Path(cmdline[0]).name == "exo":
        return tuple(cmdline[1:])
    return None


def is_node(cmdline: Sequence[str]) -> bool:
    args = node_args(cmdline)
    return args is not None and _command(args) is None


def _command(args: tuple[str, ...]) -> str | None:
    """The `exo` subcommand in `args` (doctor, bench, ...): its first positional argument. Flags are
    skipped with their values, by `exo`'s own parser's list of flags that take none; the arguments
    are not parsed, since parsing runs converters (one reads the cluster secret's file)."""
    bare, i = _flags_without_value(), 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help", "--version"):
            return "help"
        if arg == "--":
            return args[i + 1] if i + 1 < len(args) else None
        if not arg.startswith("-") or arg == "-":
            return arg
        takes_value = arg.startswith("--") and "=" not in arg and arg not in bare
        i += 2 if takes_value else 1
    return None


@functools.cache
def _flags_without_value() -> frozenset[str]:
    from exo.main import _parser  # the very flags a node is started with

    return frozenset(flag for action in _parser()._actions if action.nargs == 0 for flag in action.option_strings)


def runner_marker(cmdline: Sequence[str]) -> tuple[int, str | None] | None:
    """(node pid, `instance.rank`) of a runner's command line, else None."""
    if list(cmdline[1:3]) != ["-m", RUNNER_MODULE] or len(cmdline) < 5 or not cmdline[4].isdigit():
        return None
    try:
        spec = json.loads(cmdline[3])
        instance = spec["instanceId"] if "instanceId" in spec else spec["instance_id"]  # either spelling
        runner_id = f"{instance}.{spec['rank']}"
    except (ValueError, KeyError, TypeError):
        runner_id = None
    return int(cmdline[4]), runner_id


def classify(procs: Iterable[Proc], self_pid: int) -> tuple[list[tuple[Proc, list[Proc]]], list[tuple[Proc, str]]]:
    """Nodes with their runners, and orphaned runners with the reason, from a snapshot of processes."""
    by_pid = {p.pid: p for p in procs}
    nodes: dict[int, tuple[Proc, list[Proc]]] = {
        p.pid: (p, []) for p in by_pid.values() if p.pid != self_pid and is_node(p.cmdline)}
    orphans: list[tuple[Proc, str]] = []
    for proc in by_pid.values():
        if (marker := runner_marker(proc.cmdline)) is None:
            continue
        node_pid = marker[0]
        if node_pid in nodes and proc.ppid == node_pid:
            nodes[node_pid][1].append(proc)
        elif node_pid not in by_pid:
            orphans.append((proc, f"node pid={node_pid} is gone"))
        elif node_pid not in nodes:
            orphans.append((proc, f"pid={node_pid} is not an exo node: {' '.join(by_pid[node_pid].cmdline)[:80]}"))
        else:
            orphans.append((proc, f"its parent pid={proc.ppid} is not its node pid={node_pid}"))
    return list(nodes.values()), orphans


def listening(pid: int) -> tuple[tuple[int, ...], bool]:
    """The TCP ports `pid` listens on, and whether it holds the mDNS port (runs discovery)."""
    try:
        conns = psutil.Process(pid).net_connections(kind="inet")
    except psutil.Error:
        return (), False
    tcp = sorted({c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN})
    mdns = any(c.type == socket.SOCK_DGRAM and c.laddr and c.laddr.port == MDNS_PORT for c in conns)
    return tuple(tcp), mdns


def _runner(proc: Proc) -> RunnerProcess:
    node_pid, runner_id = runner_marker(proc.cmdline) or (0, None)
    return RunnerProcess(pid=proc.pid, node_pid=node_pid, runner_id=runner_id, rss=proc.rss,
                         ports=listening(proc.pid)[0], create_time=proc.create_time)


def scan(self_pid: int | None = None) -> tuple[tuple[NodeProcess, ...], tuple[OrphanedRunner, ...]]:
    """This machine's exo nodes (with their runners) and orphaned runners, leaving out `self_pid`."""
    nodes, orphans = classify(snapshot(), os.getpid() if self_pid is None else self_pid)
    found = []
    for node, runners in nodes:
        ports, mdns = listening(node.pid)
        found.append(NodeProcess(pid=node.pid, args=redact_args(node_args(node.cmdline) or ()), rss=node.rss,
                                 ports=ports, discovery=mdns, runners=tuple(_runner(r) for r in runners)))
    return tuple(found), tuple(OrphanedRunner(**_runner(p).model_dump(), reason=why) for p, why in orphans)


def node_command_lines() -> list[tuple[str, ...]]:
    """Every node's flags as given, secrets included: for scrubbing them from a bundle."""
    return [node_args(p.cmdline) or () for p in snapshot() if is_node(p.cmdline)]


def port_holder(port: int, exo_pids: set[int], nodes_unseen_may_hold: bool) -> str | None:
    """Who listens on TCP `port`, if it is not exo (None when nobody, or exo, does). A socket whose process
    this user may not inspect counts only when no exo node runs here, as it might be that node's."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return None
    for conn in conns:
        if conn.status != psutil.CONN_LISTEN or conn.laddr.port != port or conn.pid in exo_pids:
            continue
        if conn.pid is None:
            return None if nodes_unseen_may_hold else "a process of another user (run as root to see which)"
        try:
            return f"pid={conn.pid} ({' '.join(psutil.Process(conn.pid).cmdline())[:80]})"
        except psutil.Error:
            return f"pid={conn.pid}"
    return None


@dataclass(frozen=True)
class Stopped:
    runner: OrphanedRunner
    how: str  # SIGTERM, SIGKILL, exited (by itself, before its turn), or why it could not be stopped
    stopped: bool  # it is gone


def stop_orphans(self_pid: int | None = None, grace: float = 5.0) -> list[Stopped]:
    """Stop every orphaned runner: SIGTERM, `grace` seconds, then SIGKILL. Nothing else is touched: each
    is checked again just before, by its marker and start time, so a reused pid is left alone."""
    _, orphans = scan(self_pid)
    targets: dict[int, tuple[psutil.Process, OrphanedRunner]] = {}
    results = []
    for orphan in orphans:
        try:
            process = psutil.Process(orphan.pid)
            if process.create_time() != orphan.create_time or runner_marker(process.cmdline()) is None:
                raise psutil.NoSuchProcess(orphan.pid)  # it exited, and its pid went to another process
            process.terminate()
            targets[orphan.pid] = (process, orphan)
        except psutil.NoSuchProcess:
            results.append(Stopped(orphan, "exited", True))
        except psutil.Error as e:
            results.append(Stopped(orphan, f"error: {e}", False))
    alive = _wait_gone([p for p, _ in targets.values()], grace)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    unkillable = _wait_gone(alive, grace)
    for process, orphan in targets.values():
        if process in unkillable:
            results.append(Stopped(orphan, "error: it survived SIGKILL", False))
        else:
            results.append(Stopped(orphan, "SIGKILL" if process in alive else "SIGTERM", True))
    return results


def _wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes still running after `timeout`; one that exited but that its parent has not reaped yet
    (a zombie: it holds neither memory nor ports) counts as gone, as psutil.wait_procs would not."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in processes if _running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() not in _GONE_STATUSES
    except psutil.NoSuchProcess:
        return False
