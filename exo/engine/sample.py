"""Samplers: closures from logits `[B, V]` to token ids `[B]`, built once per request."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Sampler:
    """Greedy at temperature 0; otherwise temperature sampling, restricted to the top-p nucleus."""
    if temperature <= 0:
        return lambda logits: mx.argmax(logits, axis=-1)
    key = mx.random.key(seed) if seed is not None else None

    def sample(logits: mx.array) -> mx.array:
        nonlocal key
        logprobs = (logits / temperature).astype(mx.float32)
        if top_p < 1.0:
            logprobs = _top_p_filter(logprobs, top_p)
        if key is None:
            return mx.random.categorical(logprobs, axis=-1)
        key, subkey = mx.random.split(key)
        return mx.random.categorical(logprobs, axis=-1, key=subkey)

    return sample


def _top_p_filter(logits: mx.array, top_p: float) -> mx.array:
    """Mask every token outside the smallest set whose probability reaches `top_p`."""
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    # keep a token if the mass before it is still below top_p (the top token is always kept)
    keep_sorted = (mx.cumsum(probs, axis=-1) - probs) < top_p
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    return mx.where(keep, logits, -mx.inf)
