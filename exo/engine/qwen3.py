"""Qwen 3 (dense): the Llama architecture with q and k RMS-normalised per head before the rotation,
and a head size of its own (not hidden size / heads).

As with Qwen 2, GGUF files store q and k unpermuted: the rotation pairs each head's two halves.
"""

from __future__ import annotations

from typing import Any, ClassVar

from exo.engine.llama import LlamaShard


class Qwen3Shard(LlamaShard):
    family: ClassVar[dict[str, Any]] = {"qk_norm": True}
    gguf_interleaved: ClassVar[bool] = False
