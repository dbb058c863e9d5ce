"""Running a model's layer ranges one after another, as a pipeline of nodes would."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from exo.engine.base import LayerRange


def run_in_sequence(shards: Sequence[LayerRange], prompt: Sequence[int], steps: int = 2) -> list[mx.array]:
    """Logits of a prefill of `prompt` and then `steps` greedy decode steps, each range with its own cache."""
    caches = [shard.make_cache() for shard in shards]

    def forward(inputs: mx.array) -> mx.array:
        for shard, cache in zip(shards, caches, strict=True):
            inputs = shard(inputs, cache)
        return inputs

    logits = [forward(mx.array(prompt, dtype=mx.int32)[None])]
    for _ in range(steps):
        token = mx.argmax(logits[-1][:, -1, :], axis=-1)[:, None]
        logits.append(forward(token))
    mx.eval(logits)
    return logits


def carve(whole: LayerRange, start: int, end: int) -> LayerRange:
    """The range `[start, end)` of `whole`, sharing its weights (layers renumbered from 0)."""
    shard = type(whole)(whole.args, start, end)
    weights = {}
    for name, value in tree_flatten(whole.parameters()):
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            if start <= int(index) < end:
                weights[f"layers.{int(index) - start}.{rest}"] = value
        elif name.startswith("embed_tokens.") and "embed_tokens" in shard:
            weights[name] = value
        elif name.startswith(("norm.", "lm_head.")) and shard.is_last:
            weights[name] = value
    shard.load_weights(list(weights.items()), strict=True)
    return shard
