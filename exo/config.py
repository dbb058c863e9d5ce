"""A node's configuration: one typed object, built from flags and the environment, passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
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

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: object) -> Config:
        home = Path(env.get("EXO_HOME") or Path.home() / ".exo").expanduser()
        models_dir = Path(env.get("EXO_MODELS_DIR") or home / "models").expanduser()
        settings: dict[str, object] = {"home": home, "models_dir": models_dir}
        if blas := env.get("EXO_BLAS"):
            settings["blas"] = blas
        if dtype := env.get("EXO_DTYPE"):
            settings["dtype"] = dtype
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**settings)  # type: ignore[arg-type]
