import os
import subprocess
import sys

import pytest
from conftest import DEFAULT, NATIVE

from exo import kernels

REPORT = "import exo.kernels as k; i = k.info(); print(i.path, i.threads, '|', i.reason)"


def _info_under(**env: str) -> str:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", REPORT], env=full, capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


def test_exo_kernels_stock_forces_mlx_and_says_so():
    assert _info_under(EXO_KERNELS="stock").startswith("stock 1 | stock MLX was asked for")


@pytest.mark.skipif(not NATIVE, reason="exo's native kernels are not built here")
def test_default_is_the_fastest_float_path_the_cpu_runs_on_the_configured_threads():
    assert _info_under(EXO_KERNELS="", EXO_KERNEL_THREADS="3").startswith(f"{DEFAULT} 3 |")


@pytest.mark.skipif("avx512vnni" not in NATIVE, reason="this CPU has no AVX-512 VNNI")
def test_int8_activations_only_when_asked_for():
    assert _info_under(EXO_KERNELS="avx512vnni").startswith("avx512vnni ")
    assert "avx512vnni" not in _info_under(EXO_KERNELS="").split("|")[0]


@pytest.mark.skipif(not NATIVE, reason="exo's native kernels are not built here")
def test_a_path_that_cannot_run_falls_back_and_says_why():
    out = _info_under(EXO_KERNELS="vector9000")
    assert out.startswith(f"{DEFAULT} ") and "EXO_KERNELS=vector9000 refused" in out


def test_use_refuses_an_unknown_path():
    with pytest.raises(ValueError, match="unknown kernel path"):
        kernels.use("sse9")
