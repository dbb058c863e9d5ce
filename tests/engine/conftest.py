"""Fixtures for the engine tests: the real chat prompt every end-to-end check starts from."""

from __future__ import annotations

import pytest

from exo.engine.loading import LoadedModel

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def france_prompt(smollm: LoadedModel) -> list[int]:
    """The token ids of SmolLM2's chat prompt asking for the capital of France."""
    return smollm.tokenizer.encode(smollm.tokenizer.apply_chat_template(FRANCE))
