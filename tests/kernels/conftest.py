import pytest

from exo import kernels

NATIVE = kernels._native.supported_paths() if kernels._native is not None else []
ALL = [*NATIVE, "stock"]
DEFAULT = next((p for p in NATIVE if p not in kernels.INT8_PATHS), "stock")  # what a node runs unless told


@pytest.fixture(params=["avx512vnni", "avx512", "avx2", "portable", "stock"])
def path(request):
    """Each kernel path in turn (skipping those this build or CPU cannot run), restored afterwards."""
    if request.param != "stock" and request.param not in NATIVE:
        pytest.skip(f"this CPU or build cannot run the {request.param} kernels ({kernels.info().reason})")
    before = kernels.info()
    kernels.use(request.param, threads=2)
    yield request.param
    kernels.use(before.path, before.threads)
    kernels._info = before  # its reason too: later tests compare this process's choice with a node's
