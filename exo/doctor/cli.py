"""`exo doctor` and `exo cleanup`: their flags, and how each runs."""

from __future__ import annotations

import argparse
import logging
import platform
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from exo import __version__
from exo.config import DEFAULT_API_PORT, Config
from exo.doctor import bundle
from exo.doctor.probe import ask, browse, cluster_view
from exo.doctor.processes import node_command_lines, port_holder, scan, stop_orphans
from exo.doctor.report import Browse, Report, find_issues, render
from exo.doctor.secrets import redact, secret_values

BROWSE_SECONDS = 1.5
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "::", socket.gethostname()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_API_PORT}",
                        help="the local node's API, asked for /health and /state (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (the verdict in it)")
    parser.add_argument("--bundle", nargs="?", const="", metavar="PATH",
                        help="also write a support archive (.tar.gz: versions, config without secrets, report, "
                             "recent logs, /state, /health) to PATH (default: ./exo-support-HOST-TIME.tar.gz)")
    parser.add_argument("--log", type=Path, metavar="FILE",
                        help="the node's log file for the bundle (default: EXO_LOG_FILE, else the `exo` "
                             "systemd unit's journal, else EXO_HOME/node.log)")
    parser.add_argument("--no-browse", action="store_true",
                        help=f"skip the {BROWSE_SECONDS} s mDNS browse for other exo nodes")


def collect(url: str, *, api_key: str | None = None,
            browse_for: float | None = None) -> tuple[Report, dict[str, Any] | None, dict[str, Any] | None]:
    """Everything `exo doctor` reports, with the issues found, and the node's raw /health and /state."""
    nodes, orphans = scan()
    api, health, state = ask(url, api_key)
    holder = None
    parts = urlsplit(url)
    if not api.answering and (parts.hostname or "") in _LOCAL_HOSTS:
        exo_pids = {n.pid for n in nodes} | {r.pid for n in nodes for r in n.runners} | {o.pid for o in orphans}
        holder = port_holder(parts.port or (443 if parts.scheme == "https" else 80), exo_pids, bool(nodes))
    rss = sum(n.rss + sum(r.rss for r in n.runners) for n in nodes) + sum(o.rss for o in orphans)
    report = Report(version=__version__, host=socket.gethostname(), platform=platform.platform(), nodes=nodes,
                    orphans=orphans, rss_total=rss, memory_available=psutil.virtual_memory().available, api=api,
                    cluster=cluster_view(state) if state else None, port_holder=holder,
                    browse=browse(browse_for) if browse_for else Browse(ran=False))
    issues, notes = find_issues(report)
    return report.model_copy(update={"issues": issues, "notes": notes}), health, state


def run_doctor(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Print the report, ending with its one-line verdict; 0 when there are no issues, 1 when there are."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the report
    try:
        config: Config | None = Config.from_env(env, api_key=getattr(args, "api_key", None))  # exo --api-key K doctor
    except (OSError, ValueError) as e:  # say so in the report, but diagnose anyway
        print(f"exo doctor: the configuration in the environment is not valid: {e}", file=sys.stderr)
        config = None
    api_key = config.api_key if config else env.get("EXO_API_KEY")
    report, health, state = collect(args.url, api_key=api_key,
                                    browse_for=None if args.no_browse else BROWSE_SECONDS)
    text = render(report)
    if args.bundle is not None:
        path = Path(args.bundle) if args.bundle else bundle.default_path()
        _write_bundle(path, args.log, env, config, report, text, health, state)
        text = text.replace("\nverdict: ", f"\nbundle: {path.resolve()}\nverdict: ")
        if args.json:
            print(f"bundle: {path.resolve()}", file=sys.stderr)  # stdout is the JSON alone
    print(report.model_dump_json(indent=2, by_alias=False) if args.json else text)
    return 1 if report.issues else 0


def _write_bundle(path: Path, log_file: Path | None, env: Mapping[str, str], config: Config | None, report: Report,
                  text: str, health: dict[str, Any] | None, state: dict[str, Any] | None) -> None:
    if log_file is None and env.get("EXO_LOG_FILE"):
        log_file = Path(env["EXO_LOG_FILE"])
    home = config.home if config else Path(env.get("EXO_HOME") or Path.home() / ".exo").expanduser()
    source, logs = bundle.recent_logs(log_file, home)
    members = {"versions.json": bundle.to_json(bundle.versions(health)),
               "config.json": bundle.to_json(redact(config) if config else {"error": "not valid, see report"}),
               "report.json": report.model_dump_json(indent=2, by_alias=False) + "\n", "report.txt": text + "\n",
               "logs.txt": f"# source: {source}\n{logs}"}
    if state is not None:
        members["state.json"] = bundle.to_json(state)
    if health is not None:
        members["health.json"] = bundle.to_json(health)
    bundle.write(path, members, secret_values(config, env, node_command_lines()))


def run_cleanup() -> int:
    """Stop exo's orphaned runners and say which pids and ports that freed; 1 if one could not be stopped."""
    stopped = stop_orphans()
    for s in stopped:
        r = s.runner
        print(f"{'stopped' if s.stopped else 'failed'} orphan pid={r.pid} runner={r.runner_id or '?'} "
              f"node_pid={r.node_pid} ports={','.join(map(str, r.ports)) or '-'} rss={r.rss / 1e6:.0f} MB "
              f"how={s.how}")
    done = [s.runner.pid for s in stopped if s.stopped]
    freed = sorted({p for s in stopped if s.stopped for p in s.runner.ports})
    if not stopped:
        print("cleanup: no orphaned runners")
    else:
        print(f"cleanup: stopped {len(done)} of {len(stopped)} orphaned runners, "
              f"pids={','.join(map(str, done)) or '-'} freed_ports={','.join(map(str, freed)) or '-'}")
    return 0 if len(done) == len(stopped) else 1
