"""The engine's compute kernels: exo's own CPU code where it is built and the CPU can run it, stock MLX otherwise.

Every function here has one meaning whatever runs it; `info()` says which code path this process
uses and why. The stock path is always there, so a node without the native module still serves,
only slower.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class KernelInfo:
    path: str  # "avx512-vnni", "avx512", "avx2", "portable" or "stock"
    reason: str  # why this path: what was found, or why the native module is not used
    threads: int


def info() -> KernelInfo:
    return KernelInfo("stock", "exo's native kernels are not built", 1)


def quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *,
                     group_size: int, bits: int) -> mx.array:
    """`x @ dequantize(w).T` for MLX's affine format (`w` as `mx.quantize` packs it)."""
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, weight, eps)


def rope(x: mx.array, *, dims: int, traditional: bool, base: float, scale: float = 1.0,
         offset: int | mx.array = 0) -> mx.array:
    """Rotary embedding of `x` `[B, H, L, D]`, positions from `offset`."""
    return mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset)


def cache_append(cache: mx.array, new: mx.array, offset: int) -> mx.array:
    """`cache` `[B, H, capacity, D]` with `new` `[B, H, L, D]` written at positions `[offset, offset + L)`.
    The native path writes in place into `cache`'s buffer; callers must use the returned array."""
    cache[..., offset : offset + new.shape[2], :] = new
    return cache


def decode_attention(q: mx.array, keys: mx.array, values: mx.array, *, length: int, scale: float) -> mx.array:
    """Attention of one query row per head, `q` `[B, Hq, 1, D]`, over the first `length` positions of
    `keys`/`values` `[B, Hkv, capacity, D]` (grouped-query: Hq a multiple of Hkv)."""
    return mx.fast.scaled_dot_product_attention(q, keys[..., :length, :], values[..., :length, :], scale=scale)
