"""Choose the BLAS that MLX's CPU backend calls into.

MLX's Linux CPU wheel bundles a reference BLAS; a tuned one preloaded into the process before
MLX loads makes fp32 matmuls several times faster (see docs/benchmarks.md). Preloading can only
happen at process start, so the `exo` command re-executes itself once with `LD_PRELOAD` set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Literal

Blas = Literal["auto", "blis", "openblas", "bundled"]

# In order of preference: BLIS is the fastest at the one-row products of decoding.
_LIBRARIES = {"blis": ("blis", "blis-pthread"), "openblas": ("openblas",)}
PRELOADED_MARKER = "EXO_BLAS_PRELOADED"


def find_blas(choice: Blas) -> str | None:
    """The loadable shared library for `choice` ("auto": the best one installed), or None."""
    if choice == "bundled":
        return None
    kinds = list(_LIBRARIES) if choice == "auto" else [choice]
    for kind in kinds:
        for name in _LIBRARIES[kind]:
            if (found := ctypes.util.find_library(name)) and _loadable(found):
                return found
    return None


def _loadable(library: str) -> bool:
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


def preload_env(library: str, env: dict[str, str]) -> dict[str, str]:
    """`env` with `library` preloaded into the next process started with it."""
    preload = " ".join(filter(None, [library, env.get("LD_PRELOAD", "")]))
    return {**env, "LD_PRELOAD": preload, PRELOADED_MARKER: library}


def reexec_with(library: str) -> None:
    """Replace this process with itself, `library` preloaded; returns only if already done."""
    if os.environ.get(PRELOADED_MARKER) == library or sys.platform != "linux":
        return
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], preload_env(library, dict(os.environ)))
