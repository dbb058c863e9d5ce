"""Shared fixtures: the real default model, fetched once into a cache that outlives the test run."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from exo.api.app import create_app
from exo.config import Config
from exo.engine.loading import LoadedModel, load
from exo.models.cards import CARDS, DEFAULT_MODEL
from exo.models.catalog import ModelCatalog
from exo.models.store import ModelStore
from exo.worker.engine import LocalEngine


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The node's own model cache (EXO_MODELS_DIR, or ~/.exo/models), where setup fetched the model."""
    path = Config.from_env().models_dir
    ModelStore(path, progress=False).ensure(CARDS[DEFAULT_MODEL])
    return path


@pytest.fixture(scope="session")
def model_path(models_dir: Path) -> Path:
    return ModelStore(models_dir).path(CARDS[DEFAULT_MODEL])


@pytest.fixture(scope="session")
def smollm(model_path: Path) -> LoadedModel:
    """The whole default model, loaded once for every engine test."""
    return load(model_path)


@pytest.fixture(scope="session")
def engine(models_dir: Path) -> Iterator[LocalEngine]:
    engine = LocalEngine(ModelCatalog(ModelStore(models_dir, progress=False)))
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture
async def client(engine: LocalEngine) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://exo.test", timeout=120) as client:
        yield client
