"""`exo doctor` and `exo cleanup`: what is wrong with exo on this machine, and stopping orphaned runners.

`exo doctor` finds exo's processes by their markers only (`-m exo.main` or the `exo` script for a
node, `-m exo.worker.runner SPEC NODE_PID` for a runner; see `processes`), never by loose names:
each node with its runners, their listening ports and memory, and orphaned runners (whose node is
gone, so nothing will ever stop them). It asks the node's API (--url) for /health and /state (peers
seen, master), and browses mDNS for `_exo._tcp` services for 1.5 s (--no-browse skips it).

The text report is one `key=value` line per thing and ends with one line, `verdict: ...`: either
`verdict: no issues` (exit 0) or the kinds of the issues found, most pressing first, joined by
"; " (exit 1), each explained above it on an `issue: KIND: DETAIL` line. The kinds are listed in
`report.IssueKind`; `--json` prints the same report as JSON, its verdict under "verdict".
`--bundle [PATH]` also writes a support archive (see `bundle`).

`exo cleanup` stops the orphaned runners (SIGTERM, then SIGKILL after 5 s), each checked again
by marker and start time just before, and prints one `stopped orphan pid=... how=SIGTERM|SIGKILL|exited`
(or `failed orphan ... how=error: ...`) line per runner, then `cleanup: no orphaned runners` or
`cleanup: stopped N of M orphaned runners, pids=... freed_ports=...`; exit 0, or 1 if one survived.
It imports neither MLX nor the engine, so it answers in about a second even on a struggling host.
"""

from exo.doctor.cli import add_arguments, run_cleanup, run_doctor

__all__ = ["add_arguments", "run_cleanup", "run_doctor"]
