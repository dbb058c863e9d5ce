"""How to sample a chat's tokens and when to stop: one type from the API through the runner to the ring."""

from __future__ import annotations

from exo.shared.types import FrozenModel


class GenerationParams(FrozenModel):
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
