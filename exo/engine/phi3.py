"""Phi 3 (and Phi 4 mini): the Llama architecture with q/k/v and gate/up each stored as one matrix
(what the engine holds anyway), a head of its own, and rotary embeddings over each head's halves, on
only part of each head where the config says so (Phi 4 mini's `partial_rotary_factor`).

The long-context variants' per-frequency factors ("longrope", chosen by context length) are not
supported: such files are refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from exo.engine.llama import LlamaShard, ModelArgs


class Phi3Shard(LlamaShard):
    @classmethod
    def args_from_gguf(cls, get: Callable[..., Any], *, vocab_size: int, has_head: bool,
                       rope_factors: tuple[float, ...] | None = None) -> ModelArgs:
        args = super().args_from_gguf(get, vocab_size=vocab_size, has_head=has_head, rope_factors=rope_factors)
        return replace(args, rope_traditional=False)
