"""A node's configuration: one typed object, built from flags and the environment, passed down."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from exo.engine.blas import Blas
from exo.shared.types import Dtype

DEFAULT_API_PORT = 52415


@dataclass(frozen=True)
class Config:
    home: Path
    models_dir: Path
    api_host: str = "0.0.0.0"
    api_port: int = DEFAULT_API_PORT
    preload: tuple[str, ...] = ()
    dtype: Dtype = "float32"
    blas: Blas = "auto"
    verbose: bool = False
    cluster: str = "exo"
    peers: tuple[tuple[str, int], ...] = ()
    discovery: bool = True
    max_memory: int | None = None
    heartbeat_interval: float = 0.5
    peer_timeout: float = 3.0
    # The three phases of a stop: finish the requests in flight, drain the channels, release resources.
    shutdown_timeout: float = 30.0
    channel_drain_timeout: float = 5.0
    resource_cleanup_timeout: float = 10.0
    debug_coordination: bool = False  # log each phase of a stop, and of the watchdog
    queue_limit: int = 16             # requests waiting or running per instance before 503s
    watchdog_timeout: float = 60.0    # seconds without progress on a request before its runner restarts
    max_restarts: int = 3
    stream_buffer: int = 256          # pieces of a chat its client may leave unread before its stream ends
    cluster_secret: str | None = field(default=None, repr=False)  # None: any node on the network may join
    api_key: str | None = field(default=None, repr=False)  # None: the API answers anyone who reaches it

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: object) -> Config:
        home = Path(env.get("EXO_HOME") or Path.home() / ".exo").expanduser()
        models_dir = Path(env.get("EXO_MODELS_DIR") or home / "models").expanduser()
        settings: dict[str, object] = {"home": home, "models_dir": models_dir}
        for name, parse in _FROM_ENV.items():  # each setting `name` from EXO_<NAME>, when set
            if value := env.get(f"EXO_{name.upper()}"):
                settings[name] = parse(value)
        if env.get("EXO_DEBUG_COORDINATION", "") not in ("", "0", "false", "no"):
            settings["debug_coordination"] = True
        if "cluster_secret" not in settings and (secret_file := env.get("EXO_CLUSTER_SECRET_FILE")):
            settings["cluster_secret"] = read_secret(secret_file)
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**settings)  # type: ignore[arg-type]


def parse_peers(text: str) -> tuple[tuple[str, int], ...]:
    """`host:port,host:port` (the peers' API addresses) as pairs."""
    peers = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"peer {item!r} is not host:port")
        peers.append((host.strip("[]"), int(port)))
    return tuple(peers)


def read_secret(path: str) -> str:
    """A secret kept in a file (so it stays off command lines and out of unit files), surrounding
    whitespace dropped."""
    secret = Path(path).expanduser().read_text().strip()
    if not secret:
        raise ValueError(f"the secret file {path} is empty")
    return secret


_FROM_ENV: dict[str, Callable[[str], object]] = {
    "blas": str, "dtype": str, "cluster": str, "peers": parse_peers, "heartbeat_interval": float,
    "peer_timeout": float, "shutdown_timeout": float, "channel_drain_timeout": float,
    "resource_cleanup_timeout": float, "queue_limit": int, "watchdog_timeout": float, "max_restarts": int,
    "stream_buffer": int,
    "cluster_secret": str, "api_key": str}

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """`2GB`, `512MiB`, `1.5 GB` or a plain number of bytes."""
    number = text.strip().upper()
    digits = number.rstrip("KMGTIB ")
    unit = number[len(digits):].strip()
    if unit not in _UNITS or not digits:
        raise ValueError(f"{text!r} is not a size such as 2GB or 512MiB")
    return int(float(digits) * _UNITS[unit])
