"""Qwen 2 and 2.5: the Llama architecture with a bias on each of the q, k and v projections.

Unlike Llama's, the GGUF converter stores q and k unpermuted, so the rotation pairs each head's two
halves (as in Hugging Face checkpoints) rather than neighbouring elements. Hugging Face configs do
not say that q/k/v have biases: Qwen 2 always has them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from exo.engine.llama import LlamaShard


class Qwen2Shard(LlamaShard):
    family: ClassVar[dict[str, Any]] = {"attention_bias": True}
    gguf_interleaved: ClassVar[bool] = False
