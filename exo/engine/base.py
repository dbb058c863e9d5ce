"""What every architecture shares: running a contiguous layer range, and attention over the cache.

A `LayerRange` holds layers `[start, end)` of a model. The range that starts at layer 0 embeds
tokens; the range that ends at the last layer applies the final norm and the output head. Everything
in between maps a hidden state to a hidden state, so a model split into ranges and run one after
another computes exactly what the whole does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from exo import kernels
from exo.engine.cache import KVCache


class LayerRange(nn.Module):
    """Layers `[start, end)` of a model with `n_layers` blocks. Subclasses build `layers` (and, where
    the range needs them, the embedding and the head) and say how tokens are embedded and read out."""

    def __init__(self, args: Any, n_layers: int, start: int, end: int | None) -> None:
        super().__init__()
        end = n_layers if end is None else end
        if not 0 <= start < end <= n_layers:
            raise ValueError(f"layer range [{start}, {end}) is not inside [0, {n_layers})")
        self.args, self.start, self.end, self.n_layers = args, start, end, n_layers
        self.cache_dtype: mx.Dtype | None = None  # the KV cache's; None: the activations'

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.n_layers

    @classmethod
    def args_from_config(cls, config: dict[str, Any]) -> Any:
        """The architecture's ModelArgs from a Hugging Face `config.json`."""
        raise NotImplementedError

    @classmethod
    def args_from_gguf(cls, get: Callable[..., Any], *, vocab_size: int, has_head: bool,
                       rope_factors: tuple[float, ...] | None = None) -> Any:
        """The architecture's ModelArgs from a GGUF file's metadata: `get(key, default=None)` reads
        `<architecture>.<key>`, and raises if a key without a default is missing. `rope_factors` are
        the file's `rope_freqs` tensor, where it has one (what each rotary frequency is divided by)."""
        raise NotImplementedError

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """A Hugging Face checkpoint's weights as this model holds them."""
        return weights

    def embed(self, ids: mx.array) -> mx.array:
        raise NotImplementedError

    def head(self, h: mx.array) -> mx.array:
        raise NotImplementedError

    def __call__(self, inputs: mx.array, cache: list[LayerCache], *, last_only: bool = False) -> mx.array:
        """Token ids `[B, L]` (first range) or hidden states `[B, L, D]` in; hidden states or logits out.
        `cache` holds each layer's: for a batch of sequences, one KVCache per row (see `attend_rotated`).
        With `last_only` the head reads the last position alone (`[B, 1, vocab]`): a prompt's next token
        needs no logits for the positions before it, and the head is the widest matrix of the model."""
        h = self.embed(inputs) if self.is_first else inputs
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            h = layer(h, layer_cache)
        if not self.is_last:
            return h
        return self.head(h[:, -1:, :] if last_only else h)

    def make_cache(self) -> list[KVCache]:
        return [KVCache(self.cache_dtype) for _ in self.layers]


class GatedMLP(nn.Module):
    """`down(activation(gate(x)) * up(x))`, with gate and up one fused matrix (one product, not two)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.activation = activation  # one of exo.kernels.GATED_ACTIVATIONS

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(kernels.gated(self.gate_up_proj(x), self.activation))


LayerCache = KVCache | list[KVCache]  # a layer's cache: one sequence's, or one for each row of a batch


def attend(q: mx.array, k: mx.array, v: mx.array, cache: KVCache, *, scale: float,
           window: int | None = None) -> mx.array:
    """Append `k`/`v` `[B, Hkv, L, D]` to the cache and attend `q` `[B, Hq, L, D]` causally over it; with a
    `window`, each position sees only itself and the `window - 1` positions before it (sliding-window
    layers). Returns `[B, Hq, L, D]`."""
    keys, values = cache.append(k, v)
    return kernels.attention(q, keys, values, length=cache.offset, scale=scale, window=window)


def attend_rotated(q: mx.array, k: mx.array, v: mx.array, cache: LayerCache,
                   rotate: Callable[[mx.array, int | list[int]], mx.array], *, scale: float,
                   window: int | None = None) -> mx.array:
    """Rotate q and k to their positions (`rotate(x, offset)`) and `attend`. A batch's rows are sequences
    at positions of their own: each row is rotated and attends over its own sequence's cache, with the
    shapes it has alone (so it gets the numbers it gets alone)."""
    if isinstance(cache, KVCache):
        return attend(rotate(q, cache.offset), rotate(k, cache.offset), v, cache, scale=scale, window=window)
    if q.shape[2] == 1 and kernels.decodes_batches(q):  # a decode step: one node for all the rows' attention
        offsets = [c.offset for c in cache]
        q, k = rotate(q, offsets), rotate(k, offsets)
        for c in cache:
            k, v = c.reserve(k, v)  # room for one more position, and the dtype the caches hold
        out, keys, values = kernels.decode_attention(q, k, v, [c.keys for c in cache], [c.values for c in cache],
                                                     offsets, scale=scale, window=window)
        for c, new_keys, new_values in zip(cache, keys, values, strict=True):
            c.written(new_keys, new_values, 1)
        return out
    rows = zip(mx.split(q, len(cache)), mx.split(k, len(cache)), mx.split(v, len(cache)), cache, strict=True)
    return mx.concatenate([attend_rotated(*row, rotate, scale=scale, window=window) for row in rows])
