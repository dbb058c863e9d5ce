"""Running a model's layer ranges one after another, as a pipeline of nodes would."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from exo.engine.llama import LlamaShard


def run_in_sequence(shards: Sequence[LlamaShard], prompt: Sequence[int], steps: int = 2) -> list[mx.array]:
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
