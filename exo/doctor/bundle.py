"""`exo doctor --bundle`: one .tar.gz to attach to a bug report, with nothing secret in it.

Members, under one folder `exo-support-<host>-<time>/`: versions.json (exo, Python, MLX, OS and the
libraries exo talks through), config.json (the Config from this environment, secret-named fields as "***"),
report.json and report.txt (what `exo doctor` found), logs.txt (the node's recent log lines), and
state.json and health.json when the node answers. Secret values are scrubbed from every member
(see `secrets`).
"""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from exo import __version__
from exo.doctor.secrets import scrub

LOG_LINES = 500
_LOG_TAIL_BYTES = 2_000_000
_PACKAGES = ("mlx", "mlx-metal", "fastapi", "uvicorn", "pydantic", "zeroconf", "httpx", "psutil", "tokenizers")


def versions(node_health: Mapping[str, Any] | None) -> dict[str, Any]:
    libraries: dict[str, str | None] = {}
    for name in _PACKAGES:  # read from package metadata: importing MLX here would take seconds
        try:
            libraries[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            libraries[name] = None
    return {"exo": __version__, "node": (node_health or {}).get("version"), "python": sys.version,
            "os": platform.platform(), "machine": platform.machine(), "libraries": libraries}


def recent_logs(log_file: Path | None, home: Path, lines: int = LOG_LINES) -> tuple[str, str]:
    """(where they came from, the last `lines` lines) of the node's log: `log_file` if given, else the
    systemd journal of the `exo` unit, else `home/node.log`, else nothing."""
    if log_file is not None:
        return str(log_file), _tail(log_file, lines)
    if shutil.which("journalctl"):
        try:
            out = subprocess.run(["journalctl", "-u", "exo", "-n", str(lines), "--no-pager"],
                                 capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip() and not out.stdout.startswith("-- No entries --"):
                return "journalctl -u exo", out.stdout
        except (OSError, subprocess.SubprocessError):
            pass
    if (fallback := home / "node.log").is_file():
        return str(fallback), _tail(fallback, lines)
    return "none", ""


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
            data = f.read()
    except OSError as e:
        return f"(could not read {path}: {e})\n"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:]) + "\n"


def default_path() -> Path:
    return Path(f"exo-support-{socket.gethostname()}-{time.strftime('%Y%m%d-%H%M%S')}.tar.gz")


def write(path: Path, members: Mapping[str, str], secrets: set[str]) -> Path:
    """`members` (name -> text), secrets scrubbed, as `path`, readable by its owner only."""
    folder = path.name.removesuffix(".tar.gz").removesuffix(".tgz")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, text in members.items():
            data = scrub(text, secrets).encode()
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
            tar.addfile(info, io.BytesIO(data))
    return path


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str) + "\n"
