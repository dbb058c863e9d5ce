"""llama.cpp (llama-cpp-python) as the independent engine exo is checked against, on the same files."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import llama_cpp as native


@contextmanager
def reference(path: Path, **options: Any) -> Iterator[llama_cpp.Llama]:
    """`path` opened by llama.cpp, with its weight-repacking buffers off: they include the AMX kernels,
    which crash in VMs that do not hand AMX state to guests (SIGSEGV in ggml_backend_amx_mul_mat), and
    a wheel built without them cannot be told apart from a cached one built with them."""
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
