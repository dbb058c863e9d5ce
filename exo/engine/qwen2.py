"""Qwen 2 and 2.5: the Llama architecture with a bias on each of the q, k and v projections.

Unlike Llama's, the GGUF converter stores q and k unpermuted, so the rotation pairs each head's two
halves (as in Hugging Face checkpoints) rather than neighbouring elements. Hugging Face configs do
not say that q/k/v have biases: Qwen 2 always has them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from exo.engine.llama import LlamaShard, ModelArgs


class Qwen2Shard(LlamaShard):
    @classmethod
    def args_from_config(cls, config: dict[str, Any]) -> ModelArgs:
        return replace(ModelArgs.from_dict(config), attention_bias=True)

    @classmethod
    def args_from_gguf(cls, get: Callable[..., Any], *, vocab_size: int, has_head: bool,
                       rope_factors: tuple[float, ...] | None = None) -> ModelArgs:
        args = super().args_from_gguf(get, vocab_size=vocab_size, has_head=has_head, rope_factors=rope_factors)
        return replace(args, attention_bias=True, rope_traditional=False)
