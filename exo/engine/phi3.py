"""Phi 3 (and Phi 4 mini): the Llama architecture with q/k/v and gate/up each stored as one matrix
(what the engine holds anyway), a head of its own, and rotary embeddings over each head's halves, on
only part of each head where the config says so (Phi 4 mini's `partial_rotary_factor`).

The long-context variants (Phi 3 128k, Phi 3.5 mini, Phi 4 mini) rescale each rotary frequency by
factors of their own ("longrope", exo.engine.llama.LongRope): short ones within the original context,
long ones beyond, as the context an instance serves picks them.
"""

from __future__ import annotations

from typing import ClassVar

from exo.engine.llama import LlamaShard


class Phi3Shard(LlamaShard):
    gguf_interleaved: ClassVar[bool] = False
