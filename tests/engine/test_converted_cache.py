"""A GGUF file's converted layer range, kept beside it: the next load reads them instead of
converting, gives the same model, and a replaced file, a damaged entry or an unwritable directory
each still load correctly."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

from exo.engine import gguf
from exo.engine.converted import DIRECTORY, RANGES_KEPT
from exo.engine.loading import load

TEXT = "The lighthouse keeper climbed the stairs."


def beside(tmp_path: Path, source: Path) -> Path:
    """`source` in a directory of its own."""
    path = tmp_path / source.name
    shutil.copy(source, path)
    return path


@pytest.fixture
def gemma(tmp_path: Path, gemma_path: Path) -> Path:
    """The real Gemma 3 file: K-quants to convert, and a 262 144-token vocabulary."""
    return beside(tmp_path, gemma_path)


@pytest.fixture
def smollm(tmp_path: Path, model_path: Path) -> Path:
    """The real SmolLM2 file: 30 layers, and quick to load."""
    return beside(tmp_path, model_path)


def logits(path: Path, start: int = 0, end: int | None = None) -> mx.array:
    model = load(path, start, end)
    ids = mx.array(model.tokenizer.encode(TEXT))[None]
    return model.model(ids, model.model.make_cache())


def entries(path: Path) -> list[str]:
    return sorted(p.name for p in (path.parent / DIRECTORY).iterdir())


def test_the_second_load_reads_the_kept_conversion_and_gives_the_same_logits(
        gemma: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = logits(gemma)
    [kept] = entries(gemma)
    assert kept.endswith(".layers-0-18.safetensors")

    def no_conversion(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf.GGUFFile, "tensor", no_conversion)
    assert mx.array_equal(logits(gemma), first).item()


def test_only_the_ranges_used_last_are_kept(smollm: Path) -> None:
    for start, end in [(0, 10), (10, 20), (20, 30), (0, 10), (0, 15)]:
        load(smollm, start, end)
    kept = sorted(name.rsplit(".layers-", 1)[1] for name in entries(smollm))
    assert len(kept) == RANGES_KEPT and kept == ["0-10.safetensors", "0-15.safetensors", "20-30.safetensors"]


def test_a_replaced_file_is_converted_afresh_and_its_old_entries_go(smollm: Path) -> None:
    load(smollm)
    before = entries(smollm)
    os.utime(smollm, ns=(0, 10**18))  # as a new copy of the file would be
    load(smollm)
    after = entries(smollm)
    assert len(after) == 1 and not set(before) & set(after)


def test_a_damaged_entry_is_rebuilt(smollm: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = logits(smollm)
    for name in entries(smollm):
        (smollm.parent / DIRECTORY / name).write_bytes(b"not what was written")
    with caplog.at_level(logging.WARNING):
        assert mx.array_equal(logits(smollm), first).item()
        assert mx.array_equal(logits(smollm), first).item()  # and kept again, whole
    assert caplog.text.count("rebuilding") == 1


def test_where_nothing_can_be_kept_models_load_as_before(smollm: Path, caplog: pytest.LogCaptureFixture) -> None:
    (smollm.parent / DIRECTORY).write_text("a file where the directory would go")
    with caplog.at_level(logging.WARNING):
        first, second = logits(smollm), logits(smollm)
    assert mx.array_equal(first, second).item()
    assert caplog.text.count("not keeping converted models") == 1
