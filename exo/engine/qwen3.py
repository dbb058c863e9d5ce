"""Qwen 3 (dense): the Llama architecture with q and k RMS-normalised per head before the rotation,
and a head size of its own (not hidden size / heads).

As with Qwen 2, GGUF files store q and k unpermuted: the rotation pairs each head's two halves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from exo.engine.llama import LlamaShard, ModelArgs


class Qwen3Shard(LlamaShard):
    @classmethod
    def args_from_config(cls, config: dict[str, Any]) -> ModelArgs:
        return replace(ModelArgs.from_dict(config), qk_norm=True)

    @classmethod
    def args_from_gguf(cls, get: Callable[..., Any], *, vocab_size: int, has_head: bool,
                       rope_factors: tuple[float, ...] | None = None) -> ModelArgs:
        args = super().args_from_gguf(get, vocab_size=vocab_size, has_head=has_head, rope_factors=rope_factors)
        return replace(args, qk_norm=True, rope_traditional=False)
