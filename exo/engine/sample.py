"""Samplers: closures from logits `[B, V]` to token ids `[B]`, built once per request (one with
penalties remembers the tokens it gave)."""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from exo.shared.generation import GenerationParams

Sampler = Callable[[mx.array], mx.array]


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, *, min_p: float = 0.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> Sampler:
    """Greedy at temperature 0; otherwise temperature sampling, restricted to the top-p nucleus and to
    the tokens at least `min_p` times as likely as the likeliest. The penalties lower each token's
    logit by `presence_penalty` once it has been sampled and by `frequency_penalty` for each time it
    was (OpenAI's definition: over the tokens generated, not the prompt's)."""
    choose = _greedy if temperature <= 0 else _random(temperature, top_p, min_p, seed)
    if not presence_penalty and not frequency_penalty:
        return choose
    counts: mx.array | None = None  # [B, V]: how often each row sampled each token

    def penalized(logits: mx.array) -> mx.array:
        nonlocal counts
        if counts is None:
            counts = mx.zeros(logits.shape, mx.float32)
        adjusted = logits.astype(mx.float32) - frequency_penalty * counts - presence_penalty * (counts > 0)
        tokens = choose(adjusted)
        counts = counts + (mx.arange(logits.shape[-1])[None, :] == tokens[:, None])
        return tokens

    return penalized


def sampler_for(params: GenerationParams) -> Sampler:
    return make_sampler(params.temperature, params.top_p, params.seed, min_p=params.min_p,
                        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty)


def _greedy(logits: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1)


def _random(temperature: float, top_p: float, min_p: float, seed: int | None) -> Sampler:
    key = mx.random.key(seed) if seed is not None else None

    def sample(logits: mx.array) -> mx.array:
        nonlocal key
        logprobs = (logits / temperature).astype(mx.float32)
        if min_p > 0.0:  # below min_p times the top token's probability: out
            cut = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
            logprobs = mx.where(logprobs >= cut, logprobs, -mx.inf)
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
