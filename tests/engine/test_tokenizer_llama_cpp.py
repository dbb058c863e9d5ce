"""exo's tokenizers, rebuilt from the real GGUF files' metadata, split text exactly as llama.cpp does:
SmolLM2's byte-level BPE and Gemma 3's SentencePiece vocabulary (scores, byte fallback, user-defined
whitespace tokens), on text chosen to break tokenizers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from exo.engine.loading import load_tokenizer

pytest.importorskip("llama_cpp")
from exo.llama_cpp_engine import open_llama_cpp  # noqa: E402

TEXTS = [
    "Hello, world!",
    "The capital of France is",
    " leading space",
    "  two leading,  double  and trailing spaces   ",
    "runs of spaces:" + " " * 17 + "and tabs\t\t\tand newlines\n\n\n\nend",
    "\n\nstarts with newlines",
    "lines\r\nwith\rcarriage returns\r\n",
    "café, naïve, Ærøskøbing, straße, İstanbul, ﬁ ligature",
    "日本語のテキストと中文文本，还有한국어",
    "emoji 🎉 and a toned 👍🏽 and a family 👨‍👩‍👧 and a flag 🇫🇷",
    "pi is 3.14159, the year 2024, 1234567890",
    "<start_of_turn>user\nlooks like markup<end_of_turn>",
    # Not "</s>": llama.cpp makes any token spelled so an end-of-generation control token, whatever
    # the file says; Gemma 3's file says user-defined text, and exo goes by the file.
    "<|im_start|>system<|im_end|> <s> <bos> <eos> <pad> <unk> <0x41>",
    "code:\n    def f(x):\n        return x ** 2  # square\n",
    "a\u200bzero width\u00a0no-break\u2028line separator",
    "x" * 300,
    "",
]


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def model(request: pytest.FixtureRequest, model_path: Path, gemma_path: Path) -> Iterator[tuple[object, object]]:
    path = model_path if request.param == "smollm2" else gemma_path
    with open_llama_cpp(path, vocab_only=True) as model:
        yield load_tokenizer(path)[0], model


@pytest.mark.parametrize("text", TEXTS)
def test_plain_text_splits_as_llama_cpp_splits_it(model: tuple, text: str) -> None:
    tokenizer, reference = model
    ours = tokenizer.encode(text, special=False, bos=False)
    theirs = reference.tokenize(text.encode(), add_bos=False, special=False)
    assert ours == theirs, [tokenizer.decode([i]) for i in ours]
    assert tokenizer.decode(ours) == text or not text


@pytest.mark.parametrize("text", TEXTS[:12])
def test_markup_splits_as_llama_cpp_splits_it_with_special_tokens(model: tuple, text: str) -> None:
    tokenizer, reference = model
    theirs = reference.tokenize(text.encode(), add_bos=False, special=True)
    assert tokenizer.encode(text, bos=False) == theirs
