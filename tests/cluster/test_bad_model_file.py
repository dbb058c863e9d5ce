"""Model files exo cannot read: a GGUF of a tensor type no reader knows, a truncated copy of the real
model, a text file named .gguf. Each is one clear error saying what and why; a real node given them
keeps serving its other model."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from nodes import answers, start_node, stop_node, wait_for

from exo.engine.loading import load, load_tokenizer
from exo.models.cards import DEFAULT_MODEL
from exo.shared.errors import ModelFormatError

UNKNOWN_TYPE = 99  # no ggml tensor type has this id


def _gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def write_unknown_type_gguf(path: Path) -> Path:
    """A GGUF v3 file of one 256-element tensor of a type id no ggml version defines."""
    metadata = _gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("llama")  # 8: string
    tensor = _gguf_string("token_embd.weight") + struct.pack("<IQQIQ", 2, 256, 1, UNKNOWN_TYPE, 0)
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + metadata + tensor
    path.write_bytes(header + b"\0" * (-len(header) % 32) + b"\1" * 256)  # data aligned to 32 bytes
    return path


@pytest.fixture
def bad_files(tmp_path: Path, model_path: Path) -> Iterator[dict[str, tuple[Path, str]]]:
    """name -> (file, what its error must say)."""
    truncated = tmp_path / "truncated.gguf"
    with model_path.open("rb") as whole:
        truncated.write_bytes(whole.read(model_path.stat().st_size * 2 // 3))
    text = tmp_path / "notes.gguf"
    text.write_text("these are my notes, not a model\n")
    files = {"unknown": (write_unknown_type_gguf(tmp_path / "unknown.gguf"), "a tensor type exo cannot read"),
             "truncated": (truncated, "it is cut short"), "notes": (text, "it is not a GGUF file")}
    yield files
    for path, _ in files.values():
        path.unlink()


def test_each_unreadable_model_file_is_one_model_format_error(bad_files: dict[str, tuple[Path, str]]) -> None:
    for path, says in bad_files.values():
        for read in (load_tokenizer, load):
            with pytest.raises(ModelFormatError) as caught:
                read(path)
            assert caught.value.message.startswith(f"{path.name} is not a model exo can serve: ")
            assert says in caught.value.message


@pytest.mark.slow
def test_a_node_given_unreadable_model_files_logs_one_line_each_and_serves_its_other_model(
        tmp_path: Path, models_dir: Path, bad_files: dict[str, tuple[Path, str]]) -> None:
    models = [arg for path, _ in bad_files.values() for arg in ("--model", str(path))]
    node = start_node(tmp_path / "node", models_dir, "--no-discovery", *models, "--model", DEFAULT_MODEL)
    try:
        wait_for(lambda: answers(node) and httpx.get(f"{node.url}/health").json()["runners_ready"] == 1, 120,
                 "the default model's runner to be ready")
        wait_for(lambda: node.log.read_text().count("could not be placed") == len(bad_files), 30,
                 "one line for each bad file")
        log = node.log.read_text()
        assert "Traceback" not in log, node.log_tail()
        for name, (path, says) in bad_files.items():
            [line] = [line for line in log.splitlines() if f"model={name} could not be placed" in line]
            assert f"{path.name} is not a model exo can serve: " in line and says in line, line

        answer = httpx.post(f"{node.url}/v1/chat/completions", timeout=120, json={
            "model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"], answer.text
        refused = httpx.post(f"{node.url}/v1/chat/completions", timeout=60, json={
            "model": "unknown", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        error = refused.json()["error"]
        assert refused.status_code == 500 and "a tensor type exo cannot read" in error["message"], refused.text
        assert httpx.get(f"{node.url}/health").status_code == 200 and node.process.poll() is None
    finally:
        assert stop_node(node) == 0, node.log_tail()
