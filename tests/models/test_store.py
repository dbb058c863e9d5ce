"""The model cache fetches a file once, verifies it, and never hands out a damaged or partial one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exo.models.cards import CARDS, DEFAULT_MODEL
from exo.models.catalog import ModelCatalog
from exo.models.store import ModelStore, sha256_of
from exo.shared.errors import ModelFetchError, ModelNotFound

CARD = CARDS[DEFAULT_MODEL]


def test_damaged_file_is_fetched_again(model_path: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path, progress=False)
    store.path(CARD).parent.mkdir(parents=True)
    shutil.copy(model_path, store.path(CARD))
    with store.path(CARD).open("r+b") as f:
        f.seek(1_000_000)
        f.write(b"\x00" * 64)
    assert sha256_of(store.path(CARD)) != CARD.source.sha256

    path = store.ensure(CARD)

    assert sha256_of(path) == CARD.source.sha256
    assert [p.name for p in path.parent.iterdir() if p.name != ".lock"] == [CARD.filename]


def test_truncated_file_is_not_present_and_is_replaced(model_path: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path, progress=False)
    store.path(CARD).parent.mkdir(parents=True)
    store.path(CARD).write_bytes(model_path.read_bytes()[: CARD.bytes // 2])
    assert not store.is_present(CARD)

    assert store.ensure(CARD).stat().st_size == CARD.bytes


def test_two_processes_fetching_into_one_cache_both_get_the_verified_file(tmp_path: Path) -> None:
    script = ("import sys; from pathlib import Path; from exo.models.store import ModelStore; "
              "from exo.models.cards import CARDS, DEFAULT_MODEL; "
              "print(ModelStore(Path(sys.argv[1]), progress=False).ensure(CARDS[DEFAULT_MODEL]))")
    fetchers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
                for _ in range(2)]
    paths = [f.communicate(timeout=300)[0].strip() for f in fetchers]

    assert [f.returncode for f in fetchers] == [0, 0]
    assert paths[0] == paths[1]
    assert sha256_of(Path(paths[0])) == CARD.source.sha256
    assert sorted(p.name for p in Path(paths[0]).parent.iterdir()) == [".lock", CARD.filename]


def test_a_model_split_across_wheels_is_joined_in_order_and_verified(gemma_path: Path) -> None:
    card = CARDS["gemma3-270m"]

    assert len(card.source.parts) == 4
    assert gemma_path.name == card.filename == "gemma-3-270m-q4_k_m.gguf"
    assert gemma_path.stat().st_size == card.bytes
    assert sha256_of(gemma_path) == card.source.sha256
    assert gemma_path.read_bytes()[:4] == b"GGUF"


def test_a_failed_fetch_leaves_nothing_behind(tmp_path: Path) -> None:
    gone = CARD.source.parts[0].model_copy(update={"version": "0.0.0.404"})
    missing = CARD.model_copy(update={"source": CARD.source.model_copy(update={"parts": (gone,)})})
    store = ModelStore(tmp_path, progress=False)

    with pytest.raises(ModelFetchError, match="could not download"):
        store.ensure(missing)

    assert [p.name for p in store.path(missing).parent.iterdir()] == [".lock"]


def test_a_wrong_checksum_is_refused(tmp_path: Path) -> None:
    lying = CARD.model_copy(update={"source": CARD.source.model_copy(update={"sha256": "0" * 64})})
    store = ModelStore(tmp_path, progress=False)

    with pytest.raises(ModelFetchError, match="checksum mismatch"):
        store.ensure(lying)

    assert not store.path(lying).exists()


def test_catalog_serves_registry_ids_and_local_paths(model_path: Path, models_dir: Path) -> None:
    catalog = ModelCatalog(ModelStore(models_dir, progress=False))

    local_id = catalog.register(str(model_path))

    assert catalog.register(DEFAULT_MODEL) == DEFAULT_MODEL
    assert catalog.path(local_id) == model_path.resolve()
    assert {m.id for m in catalog.list()} == {*CARDS, local_id}
    with pytest.raises(ModelNotFound):
        catalog.path("no-such-model")
    with pytest.raises(ModelNotFound):
        catalog.register("/no/such/file.gguf")
