"""Per-layer key/value cache: buffers of fixed capacity written in place at an offset.

Capacity grows in steps of `step` positions, so a decode step's arrays keep their shape for
`step` tokens and `exo.kernels.cache_append` writes each new position into the buffer it has.
Attention reads the first `offset` positions (`exo.kernels.attention` takes the length).
"""

from __future__ import annotations

import mlx.core as mx

from exo import kernels


class KVCache:
    step = 256

    def __init__(self, dtype: mx.Dtype | None = None) -> None:
        self.dtype = dtype  # what the buffers hold; None: the dtype of the keys and values appended
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def append(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write `keys`/`values` `[B, H, L, D]` at the offset; return the whole buffers (the first
        `offset` positions, after the advance, are the ones in use)."""
        prev, n = self.offset, keys.shape[2]
        if self.dtype is not None and keys.dtype != self.dtype:
            keys, values = keys.astype(self.dtype), values.astype(self.dtype)
        if self.keys is None or self.values is None or prev + n > self.keys.shape[2]:
            self._grow(keys.shape, keys.dtype, prev + n)
        assert self.keys is not None and self.values is not None
        self.keys = kernels.cache_append(self.keys, keys, prev)
        self.values = kernels.cache_append(self.values, values, prev)
        self.offset = prev + n
        return self.keys, self.values

    def reserve(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Make room for `keys`/`values` `[1, H, L, D]` past the offset without writing them (for a kernel
        that writes them itself; a batch's `[B, H, L, D]`, row by row); returns them in the cache's dtype."""
        if self.dtype is not None and keys.dtype != self.dtype:
            keys, values = keys.astype(self.dtype), values.astype(self.dtype)
        if self.keys is None or self.values is None or self.offset + keys.shape[2] > self.keys.shape[2]:
            self._grow((1, *keys.shape[1:]), keys.dtype, self.offset + keys.shape[2])
        return keys, values

    def written(self, keys: mx.array, values: mx.array, n: int) -> None:
        """Take `keys`/`values`, buffers a kernel wrote `n` positions into at the offset (after `reserve`)."""
        self.keys, self.values, self.offset = keys, values, self.offset + n

    def _grow(self, shape_of: tuple[int, ...], dtype: mx.Dtype, needed: int) -> None:
        """Buffers for `needed` positions (rounded up to whole steps) of `shape_of`'s batch, heads and
        head size, the positions held copied in."""
        capacity = -(-needed // self.step) * self.step
        shape = (shape_of[0], shape_of[1], capacity, shape_of[3])
        new_k, new_v = mx.zeros(shape, dtype), mx.zeros(shape, dtype)
        if self.keys is not None and self.values is not None and self.offset:
            new_k = kernels.cache_append(new_k, self.keys[..., : self.offset, :], 0)
            new_v = kernels.cache_append(new_v, self.values[..., : self.offset, :], 0)
        self.keys, self.values = new_k, new_v

    @property
    def capacity(self) -> int:
        """Positions the buffers have room for."""
        return 0 if self.keys is None else self.keys.shape[2]

    def copy_prefix(self, n: int) -> KVCache:
        """A cache of its own holding this one's first `n` positions (`n` at most the offset)."""
        if not 0 < n <= self.offset or self.keys is None or self.values is None:
            raise ValueError(f"no prefix of {n} positions in a cache holding {self.offset}")
        copy = KVCache(self.dtype)
        copy.keys, copy.values, copy.offset = self.keys, self.values, n
        copy._grow(self.keys.shape, self.keys.dtype, n)  # buffers of its own, the first n positions copied in
        return copy

    @property
    def state(self) -> tuple[mx.array, mx.array] | None:
        return None if self.keys is None or self.values is None else (self.keys, self.values)
