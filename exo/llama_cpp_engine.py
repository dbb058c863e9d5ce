"""llama.cpp (llama-cpp-python), the independent engine exo is measured and checked against."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def open_llama_cpp(path: Path, **options: Any) -> Iterator[Any]:
    """`path` opened by llama.cpp, with its weight-repacking buffers off: they include the AMX kernels,
    which crash in VMs that do not hand AMX state to guests (SIGSEGV in ggml_backend_amx_mul_mat), and
    a wheel built without them cannot be told apart from a cached one built with them."""
    import llama_cpp
    from llama_cpp import llama_cpp as native

    default = native.llama_model_default_params

    def without_extra_buffers() -> Any:
        params = default()
        params.use_extra_bufts = False
        return params

    native.llama_model_default_params = without_extra_buffers
    try:
        model = llama_cpp.Llama(str(path), verbose=False, **options)
    finally:
        native.llama_model_default_params = default
    try:
        yield model
    finally:
        model.close()
