"""A node's configuration: one typed object, built from flags and the environment, passed down.

Every field `name` may be set as `EXO_<NAME>` in the environment or by its flag; a flag wins. Both are
validated the same way (pydantic-settings), and a bad value is one line naming the flag or variable:
`exo: EXO_BLAS='mkl': input should be 'auto', 'blis', 'openblas' or 'bundled'`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from exo.engine.blas import Blas
from exo.master.planner import DEFAULT_CONTEXT
from exo.models.cards import DEFAULT_MODEL
from exo.shared.types import CacheDtype, Context, Dtype

DEFAULT_API_PORT = 52415
MIN_SECRET_LENGTH = 16  # a shorter API key or cluster secret can be guessed from the network
_SECRETS = ("api_key", "cluster_secret")
_FLAGS = {"api_host": "--host", "preload": "--model"}  # the flags not named after their field


class ConfigError(ValueError):
    """A setting that is not valid, said in one line naming its flag or environment variable."""


class Config(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EXO_", frozen=True, extra="forbid", env_ignore_empty=True)

    home: Path = Path.home() / ".exo"
    models_dir: Path = Path.home() / ".exo" / "models"  # default: `home`/models
    api_host: str = "0.0.0.0"
    api_port: int = Field(default=DEFAULT_API_PORT, ge=1, le=65535)
    preload: Annotated[tuple[str, ...], NoDecode] = (DEFAULT_MODEL,)
    dtype: Dtype = "quantized"
    kv_cache: CacheDtype | None = None  # None: the activations' dtype (float32 unless --dtype is a half one)
    context: Context = DEFAULT_CONTEXT  # positions an instance placed here serves
    blas: Blas = "auto"
    verbose: bool = False
    cluster: str = Field(default="exo", min_length=1)
    peers: Annotated[tuple[tuple[str, int], ...], NoDecode] = ()
    discovery: bool = True
    max_memory: int | None = Field(default=None, gt=0)
    heartbeat_interval: float = Field(default=0.5, gt=0)
    peer_timeout: float = Field(default=3.0, gt=0)
    # The three phases of a stop: finish the requests in flight, drain the channels, release resources.
    shutdown_timeout: float = Field(default=30.0, ge=0)
    channel_drain_timeout: float = Field(default=5.0, ge=0)
    resource_cleanup_timeout: float = Field(default=10.0, ge=0)
    debug_coordination: bool = False  # log each phase of a stop, and of the watchdog
    queue_limit: int = Field(default=16, ge=1)  # requests waiting or running per instance before 503s
    watchdog_timeout: float = Field(default=60.0, gt=0)  # seconds without progress before a runner restarts
    max_restarts: int = Field(default=3, ge=0)
    max_body_bytes: int = Field(default=4 * 2**20, gt=0)  # the largest request body the API reads; else 413
    max_connections: int = Field(default=512, ge=1)  # open API connections; more are refused with 503 at once
    request_timeout: float = Field(default=30.0, gt=0)  # seconds a client has to send a whole request
    stream_buffer: int = Field(default=256, ge=1)  # pieces of a chat its client may leave unread before it ends
    cluster_secret: str | None = Field(default=None, repr=False)  # None: any node on the network may join
    api_key: str | None = Field(default=None, repr=False)  # None: the API answers anyone who reaches it

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: object) -> Config:
        """The settings in `env` (EXO_<NAME>), each overridden by a flag's value that is not None.
        Raises ConfigError, one line naming the flag or variable, for any value that is not valid."""
        values: dict[str, Any] = {}
        labels: dict[str, str] = {}
        for name, value in _MappingEnvSource(cls, env)().items():
            values[name], labels[name] = value, f"EXO_{name.upper()}"
        if "cluster_secret" not in values and (secret_file := env.get("EXO_CLUSTER_SECRET_FILE")):
            try:
                values["cluster_secret"] = read_secret(secret_file)
            except (OSError, ValueError) as e:
                raise ConfigError(f"EXO_CLUSTER_SECRET_FILE: {e}") from None
            labels["cluster_secret"] = "EXO_CLUSTER_SECRET_FILE"
        for name, value in overrides.items():
            if value is not None:
                values[name], labels[name] = value, _FLAGS.get(name, "--" + name.replace("_", "-"))
        try:
            return cls(**values)
        except ValidationError as e:
            raise ConfigError("; ".join(_describe(error, labels) for error in e.errors())) from None

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   **_: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)  # from_env reads the environment it is given, never os.environ behind its back

    @model_validator(mode="before")
    @classmethod
    def _models_under_home(cls, values: dict[str, Any]) -> dict[str, Any]:
        home = Path(values.get("home") or Path.home() / ".exo").expanduser()
        models_dir = Path(values.get("models_dir") or home / "models").expanduser()
        return {**values, "home": home, "models_dir": models_dir}

    @field_validator("preload", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        return tuple(filter(None, (m.strip() for m in value.split(",")))) if isinstance(value, str) else value

    @field_validator("peers", mode="before")
    @classmethod
    def _parse_peers(cls, value: object) -> object:
        return parse_peers(value) if isinstance(value, str) else value

    @field_validator("max_memory", "max_body_bytes", mode="before")
    @classmethod
    def _parse_size(cls, value: object) -> object:
        try:
            return parse_bytes(value) if isinstance(value, str) else value
        except ValueError:
            raise ValueError("not a size such as 2GB or 512MiB") from None

    @field_validator(*_SECRETS)
    @classmethod
    def _long_enough(cls, value: str | None) -> str | None:
        if value is not None and len(value) < MIN_SECRET_LENGTH:
            raise ValueError(f"must be at least {MIN_SECRET_LENGTH} characters, or it can be guessed "
                             "(make one with `openssl rand -hex 16`)")
        return value


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading the mapping it is given instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._env = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._env.items() if value != ""}  # as case_sensitive=False


def _describe(error: Any, labels: Mapping[str, str]) -> str:
    """One validation error as `LABEL='value': what is wrong` (a secret's value never shown)."""
    name = str(error["loc"][0]) if error["loc"] else ""
    label = labels.get(name, name or "settings")
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{label}: no such setting"
    shown = "" if name in _SECRETS or not isinstance(error.get("input"), str | int | float) else f"={error['input']!r}"
    return f"{label}{shown}: {message[:1].lower()}{message[1:]}"


def parse_peers(text: str) -> tuple[tuple[str, int], ...]:
    """`host:port,host:port` (the peers' API addresses) as pairs."""
    peers = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
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


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """`2GB`, `512MiB`, `1.5 GB` or a plain number of bytes."""
    number = text.strip().upper()
    digits = number.rstrip("KMGTIB ")
    unit = number[len(digits):].strip()
    if unit not in _UNITS or not digits:
        raise ValueError(f"{text!r} is not a size such as 2GB or 512MiB")
    try:
        return int(float(digits) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"{text!r} is not a size such as 2GB or 512MiB") from None
