"""The engine's compute kernels: exo's own CPU code where it is built and the CPU can run it, stock MLX otherwise.

Every function here has one meaning whatever runs it; `info()` says which code path this process
uses and why. The stock path is always there, so a node without the native module still serves,
only slower.

The native module (`exo.kernels._native`, built from csrc/ when exo is installed) holds four
builds of each kernel: AVX-512 with VNNI, AVX-512, AVX2 + FMA and portable x86-64. The default is
the fastest of the float paths this CPU runs, which compute what stock MLX computes up to the order
of float32 sums. The VNNI path rounds the activations of each quantized matmul to int8 first (as
llama.cpp does): faster, but its logits move and greedy text can part from the other paths', so a
node takes it only when asked. `EXO_KERNELS=stock|portable|avx2|avx512|avx512vnni` forces a path
and `EXO_KERNEL_THREADS` the thread count (default: the cores this process may run on). Calls the
native code does not handle (other dtypes, bit widths, group sizes, a GPU device) go to stock MLX.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger(__name__)

PATHS = ("avx512vnni", "avx512", "avx2", "portable", "stock")
INT8_PATHS = ("avx512vnni",)  # activations rounded to int8: chosen only when asked for


@dataclass(frozen=True)
class KernelInfo:
    path: str  # "avx512", "avx2", "portable" or "stock"
    reason: str  # why this path: what was found, or why the native module is not used
    threads: int


def _load_native():
    """The native module and why it can or cannot be used."""
    if mx.default_device().type != mx.DeviceType.cpu:
        return None, f"MLX runs on {mx.default_device()}; exo's kernels are for the CPU"
    try:
        from exo.kernels import _native
    except ImportError as e:
        return None, f"exo's native kernels are not built ({e}); reinstall exo with a C++ compiler and CMake"
    if _native.mlx_version != mx.__version__.split(".dev")[0]:
        return None, (f"exo's native kernels were built for MLX {_native.mlx_version}, this is {mx.__version__}; "
                      "reinstall exo")
    return _native, ""


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_native, _why_not = _load_native()
_info = KernelInfo("stock", _why_not, 1)


def use(path: str | None = None, threads: int | None = None) -> KernelInfo:
    """Choose the kernel path (None: the fastest this CPU runs) and thread count (None: all usable cores).
    Raises ValueError for a path this build or CPU cannot run."""
    global _info
    if path not in (None, *PATHS):
        raise ValueError(f"unknown kernel path {path!r}: choose one of {', '.join(PATHS)}")
    threads = threads or _default_threads()
    if path == "stock":
        _info = KernelInfo("stock", "stock MLX was asked for", 1)
    elif _native is None:
        if path is not None:
            raise ValueError(f"kernel path {path!r} is not available: {_why_not}")
        _info = KernelInfo("stock", _why_not, 1)
    else:
        supported = _native.supported_paths()
        exact = [p for p in supported if p not in INT8_PATHS]
        chosen = path or exact[0]
        if chosen not in supported:
            raise ValueError(f"this CPU cannot run the {chosen!r} kernels (it runs {', '.join(supported)})")
        _native.select(chosen, threads)
        why = "asked for" if path else f"the fastest of {', '.join(exact)} on this CPU"
        _info = KernelInfo(chosen, why, threads)
    return _info


def _use_from_environment() -> None:
    path = os.environ.get("EXO_KERNELS") or None
    threads = int(os.environ["EXO_KERNEL_THREADS"]) if os.environ.get("EXO_KERNEL_THREADS") else None
    try:
        use(path, threads)
    except ValueError as e:
        use(None, threads)
        global _info
        _info = KernelInfo(_info.path, f"EXO_KERNELS={path} refused ({e}); using {_info.path}", _info.threads)
    if _info.path == "stock":
        log.info("kernels path=stock reason=%s", _info.reason)


def info() -> KernelInfo:
    return _info


def _native_ok(*arrays: mx.array) -> bool:
    return _info.path != "stock" and all(a.dtype == mx.float32 for a in arrays)


def quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *,
                     group_size: int, bits: int) -> mx.array:
    """`x @ dequantize(w).T` for MLX's affine format (`w` as `mx.quantize` packs it)."""
    if _info.path != "stock" and x.dtype == mx.float32 and bits in (4, 8) and group_size in (32, 64, 128):
        return _native.quantized_matmul(x, w, scales, biases, group_size, bits)
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


GATED_ACTIVATIONS = ("silu", "gelu_approx")


def gated(gate_up: mx.array, activation: str) -> mx.array:
    """`activation(gate) * up` for `gate_up` `[..., 2I]` holding the gate then the up projection (a gated
    MLP's fused product); `activation` is "silu" or "gelu_approx" (gelu's tanh approximation)."""
    if _native_ok(gate_up):
        return _native.gated(gate_up, GATED_ACTIVATIONS.index(activation))
    gate, up = mx.split(gate_up, 2, axis=-1)
    return (nn.silu(gate) if activation == "silu" else nn.gelu_approx(gate)) * up


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    if _native_ok(x, weight):
        return _native.rms_norm(x, weight, eps)
    return mx.fast.rms_norm(x, weight, eps)


def rope(x: mx.array, *, dims: int, traditional: bool, base: float, scale: float = 1.0,
         offset: int | mx.array | list[int] = 0, periods: mx.array | None = None) -> mx.array:
    """Rotary embedding of `x` `[B, H, L, D]`, positions from `offset`, or from `offset[b]` for batch row b
    where it is a list (a batch of sequences, each at its own position). Frequency `i` of `dims / 2` is
    `base ** (-2i / dims)`, or `1 / periods[i]` where float32 `periods` are given (rescaled frequencies)."""
    if _native_ok(x):
        extra = [] if periods is None else [periods]
        if isinstance(offset, mx.array):
            return _native.rope(x, dims, traditional, base, scale, [0], [offset], extra)
        return _native.rope(x, dims, traditional, base, scale, offset if isinstance(offset, list) else [offset], [],
                            extra)
    if isinstance(offset, list):
        return mx.concatenate([rope(row, dims=dims, traditional=traditional, base=base, scale=scale, offset=at,
                                    periods=periods) for row, at in zip(mx.split(x, len(offset)), offset, strict=True)])
    if periods is not None:
        return mx.fast.rope(x, dims, traditional=traditional, base=None, scale=scale, offset=offset, freqs=periods)
    return mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset)


def cache_append(cache: mx.array, new: mx.array, offset: int) -> mx.array:
    """`cache` `[B, H, capacity, D]` with `new` `[B, H, L, D]` written at positions `[offset, offset + L)`.
    The native path writes in place into `cache`'s buffer; callers must use the returned array."""
    if _info.path != "stock" and cache.dtype == new.dtype:
        return _native.cache_append(cache, new, offset)
    cache[..., offset : offset + new.shape[2], :] = new
    return cache


def attention(q: mx.array, keys: mx.array, values: mx.array, *, length: int, scale: float,
              window: int | None = None) -> mx.array:
    """Causal attention of `q` `[B, Hq, L, D]` over the first `length` positions of `keys`/`values`
    `[B, Hkv, capacity, D]` (grouped-query: Hq a multiple of Hkv). Query row i sits at position
    `length - L + i` and sees the positions up to it, only the last `window` of them where a window is
    given (sliding-window layers). A float16 cache under a float32 query is read as float32."""
    if (_info.path != "stock" and q.dtype == mx.float32 and keys.dtype in (mx.float32, mx.float16)
            and values.dtype == keys.dtype):
        return _native.attention(q, keys, values, length, scale, window or 0)
    keys, values = keys[..., :length, :].astype(q.dtype), values[..., :length, :].astype(q.dtype)
    L = q.shape[2]
    if window is None or length <= window:
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask="causal" if L > 1 else None)
    queries = mx.arange(length - L, length)[:, None]
    positions = mx.arange(length)[None]
    mask = (positions <= queries) & (queries - positions < window)
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)


def decodes_batches(q: mx.array) -> bool:
    """Whether `decode_attention` takes this query (else a batch attends a row at a time)."""
    return _native_ok(q)


def decode_attention(q: mx.array, k: mx.array, v: mx.array, keys: list[mx.array], values: list[mx.array],
                     offsets: list[int], *, scale: float,
                     window: int | None = None) -> tuple[mx.array, list[mx.array], list[mx.array]]:
    """A batch's decode step in one node: row b's `k`/`v` `[B, Hkv, 1, D]` written at `offsets[b]` of its
    own `keys[b]`/`values[b]` `[1, Hkv, capacity, D]` (in place: use the caches returned), and its query
    `q` `[B, Hq, 1, D]` attending over its first `offsets[b] + 1` positions, as `attention` computes it
    alone. Native only (see `decodes_batches`)."""
    out, *caches = _native.decode_attention(q, k, v, keys, values, offsets, scale, window or 0)
    return out, caches[0::2], caches[1::2]


_use_from_environment()
