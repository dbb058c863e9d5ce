"""A stand-in for `systemctl` in the deployment tests, where no systemd runs the machine.

It records each call and runs a unit's ExecStart for real, with its Environment= and EnvironmentFile=
applied and its variables expanded as systemd does, in WorkingDirectory=, logging to a fresh file per
start, journal/INVOCATION_ID.log, which `journalctl` (this file run as `journalctl`) prints: one run's
with `_SYSTEMD_INVOCATION_ID=ID`, every run's with `-u NAME` (times are not kept: `--since` is ignored).
`show -p InvocationID|MainPID --value` answers as systemd does. It ignores User= and the sandboxing.
Stopping follows KillMode=mixed: SIGTERM to the main process, SIGKILL to what is left after
TimeoutStopSec. Its state lives in $FAKE_SYSTEMCTL_DIR; units are read from $FAKE_SYSTEMCTL_UNITS.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

STATE = Path(os.environ["FAKE_SYSTEMCTL_DIR"])
UNITS = Path(os.environ["FAKE_SYSTEMCTL_UNITS"])


def _unit(name: str) -> dict[str, list[str]]:
    """The [Service] settings of unit `name`, each key with its values in order."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in (UNITS / f"{name}.service").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def _environment(settings: dict[str, list[str]]) -> dict[str, str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(STATE)}
    for line in settings.get("Environment", []):
        env.update(word.split("=", 1) for word in shlex.split(line))
    for path in settings.get("EnvironmentFile", []):  # these override Environment=, as in systemd
        file = Path(path.removeprefix("-"))
        if not file.exists() and path.startswith("-"):
            continue
        for line in file.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                key, value = line.strip().split("=", 1)
                env[key] = value.strip("\"'")
    return env


def _command(exec_start: str, env: dict[str, str]) -> list[str]:
    """`${VAR}` is replaced within its word; a word `$VAR` becomes the value's words."""
    words: list[str] = []
    for word in shlex.split(exec_start):
        if whole := re.fullmatch(r"\$(\w+)", word):
            words.extend(env.get(whole[1], "").split())
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m[1], ""), word))
    return words


def _main_process(name: str) -> psutil.Process | None:
    try:
        process = psutil.Process(int((STATE / f"{name}.pid").read_text()))
        return None if process.status() == psutil.STATUS_ZOMBIE else process
    except (FileNotFoundError, ValueError, psutil.Error):
        return None


def start(name: str) -> None:
    if _main_process(name):
        return
    settings = _unit(name)
    env = _environment(settings)
    invocation = uuid.uuid4().hex
    (STATE / "journal").mkdir(exist_ok=True)
    with (STATE / "journal" / f"{invocation}.log").open("ab") as log:  # O_APPEND, as a journal
        process = subprocess.Popen(_command(settings["ExecStart"][-1], env), env=env, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=settings.get("WorkingDirectory", [str(STATE)])[-1])
    (STATE / f"{name}.pid").write_text(str(process.pid))
    (STATE / f"{name}.invocation").write_text(invocation)
    with (STATE / "journal" / "order").open("a") as order:
        order.write(invocation + "\n")


def show(name: str, prop: str) -> str:
    if prop == "InvocationID":
        path = STATE / f"{name}.invocation"
        return path.read_text() if path.exists() else ""  # the last run's, also once it has exited
    if prop == "MainPID":
        return str(process.pid) if (process := _main_process(name)) else "0"
    raise SystemExit(f"fake systemctl: show -p {prop} is not faked")


def journalctl(argv: list[str]) -> int:
    journal = STATE / "journal"
    runs = (journal / "order").read_text().split() if (journal / "order").exists() else []
    if match := [a for a in argv if a.startswith("_SYSTEMD_INVOCATION_ID=")]:
        runs = [match[0].split("=", 1)[1]]
    for run in runs:
        if (journal / f"{run}.log").exists():
            sys.stdout.write((journal / f"{run}.log").read_text(errors="replace"))
    return 0


def stop(name: str) -> None:
    if not (process := _main_process(name)):
        return
    timeout = float(_unit(name).get("TimeoutStopSec", ["90"])[-1].removesuffix("s"))
    rest = process.children(recursive=True)
    process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _main_process(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    for leftover in [process, *rest]:
        try:
            leftover.kill()
        except psutil.Error:
            pass
    (STATE / f"{name}.pid").unlink()


def is_active(name: str) -> int:
    if _main_process(name):
        print("active")
        return 0
    print("failed" if (STATE / f"{name}.pid").exists() else "inactive")
    return 3


def main(argv: list[str]) -> int:
    if os.environ.get("FAKE_SYSTEMCTL_AS") == "journalctl":  # the test bin directory's journalctl
        return journalctl(argv)
    with (STATE / "calls").open("a") as calls:
        calls.write(" ".join(argv) + "\n")
    args = [a for a in argv if not a.startswith("-")]
    verb, names = args[0], [n.removesuffix(".service") for n in args[1:]]
    if verb in ("start", "restart", "stop"):
        for name in names:
            if verb != "start":
                stop(name)
            if verb != "stop":
                start(name)
    elif verb == "enable" and "--now" in argv:
        for name in names:
            start(name)
    elif verb == "show":
        print(show(names[-1], argv[argv.index("-p") + 1]))
    elif verb == "is-active":
        return max(is_active(name) for name in names)
    elif verb not in ("daemon-reload", "enable", "disable"):
        print(f"fake systemctl: {verb} is not faked", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
