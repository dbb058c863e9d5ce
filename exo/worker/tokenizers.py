"""The node's tokenizers, one per model it renders prompts for, loaded once and kept."""

from __future__ import annotations

import anyio

from exo.engine.llama import ModelArgs
from exo.engine.loading import load_tokenizer
from exo.engine.tokenizer import Tokenizer
from exo.models.catalog import ModelCatalog


class Tokenizers:
    def __init__(self, catalog: ModelCatalog) -> None:
        self.catalog = catalog
        self._loaded: dict[str, tuple[Tokenizer, ModelArgs]] = {}
        self._lock = anyio.Lock()

    async def get(self, model_id: str) -> tuple[Tokenizer, ModelArgs]:
        if (found := self._loaded.get(model_id)) is None:
            async with self._lock:
                if (found := self._loaded.get(model_id)) is None:
                    path = await anyio.to_thread.run_sync(self.catalog.path, model_id)
                    found = self._loaded[model_id] = await anyio.to_thread.run_sync(load_tokenizer, path)
        return found
