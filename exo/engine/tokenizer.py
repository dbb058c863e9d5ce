"""Tokenizer and chat template, read from GGUF metadata or from a model directory."""

from __future__ import annotations

import functools
import json
import threading
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import decoders, models, normalizers, pre_tokenizers

from exo.shared.errors import ChatTemplateError, ModelFormatError

# llama.cpp's names for the pre-tokenizer a GGUF vocabulary was trained with.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "llama-bpe": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}
# llama.cpp's token types that are matched in the text before the model sees it: control tokens
# (<|im_end|>, <start_of_turn>) only in a template's markup, user-defined ones everywhere.
_UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 2, 3, 4, 6


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, *, chat_template: str | None, bos_id: int | None,
                 eos_ids: Sequence[int], add_bos: bool) -> None:
        self.backend = backend
        # Message contents are encoded with special tokens' text read as plain text: a flag on the one
        # backend (a copy costs seconds for a large vocabulary), so encoding takes turns.
        self._encoding = threading.Lock()
        self._specials = tuple(t.content for t in backend.get_added_tokens_decoder().values() if t.special)
        self.bos_id, self.add_bos = bos_id, add_bos
        self.eos_ids = tuple(dict.fromkeys(eos_ids))
        self.chat_template = chat_template
        # What Hugging Face renders templates with, and what real templates rely on: loop controls
        # (`{% break %}`), JSON without HTML escaping, the date, and a way to refuse messages.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
        self._template = env.from_string(chat_template) if chat_template else None

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = list(meta.get("tokenizer.ggml.token_type", ()))
        if kind == "gpt2" and pre in _GGUF_PRE_TOKENIZERS:
            backend = _byte_level_bpe(tokens, meta["tokenizer.ggml.merges"], _GGUF_PRE_TOKENIZERS[pre]())
        elif kind == "llama":
            backend = _sentencepiece_bpe(tokens, meta["tokenizer.ggml.scores"], types,
                                         add_space_prefix=meta.get("tokenizer.ggml.add_space_prefix", True))
        else:
            raise ModelFormatError(f"GGUF tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported")
        backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                            for t, ty in zip(tokens, types, strict=False) if ty == _USER_DEFINED])
        backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(tokens, types, strict=False) if ty == _CONTROL])

        def token_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            return None if value is None else int(value)

        eos = [i for i in (token_id("eos_token_id"), token_id("eot_token_id")) if i is not None]
        # Gemma's turns end with <end_of_turn>, which its files do not name as eot
        eos += [i for i, t in enumerate(tokens) if t == "<end_of_turn>" and types[i] == _CONTROL]
        return cls(backend, chat_template=meta.get("tokenizer.chat_template"), bos_id=token_id("bos_token_id"),
                   eos_ids=eos, add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")))

    @classmethod
    def from_directory(cls, path: Path) -> Tokenizer:
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        template = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()

        def token_id(token: str | dict[str, str] | None) -> int | None:
            text = token.get("content") if isinstance(token, dict) else token
            return backend.token_to_id(text) if text else None

        eos: list[int] = []
        for source in (_read_json(path / "generation_config.json"), _read_json(path / "config.json")):
            value = source.get("eos_token_id")
            eos += value if isinstance(value, list) else [value] if value is not None else []
        if (config_eos := token_id(config.get("eos_token"))) is not None:
            eos.append(config_eos)
        return cls(backend, chat_template=template, bos_id=token_id(config.get("bos_token")), eos_ids=eos,
                   add_bos=bool(config.get("add_bos_token", False)))

    def encode(self, text: str, *, special: bool = True, bos: bool = True) -> list[int]:
        """`text`'s tokens: with `special`, control tokens' text becomes those tokens (as llama.cpp's
        `special=True`); with `bos`, the model's BOS token leads if the model asks for one."""
        ids = self._encode([text], plain=not special)[0]
        return self._with_bos(ids) if bos else ids

    def _encode(self, texts: list[str], *, plain: bool) -> list[list[int]]:
        with self._encoding:  # in batches, because the tokenizer lets go of the GIL only for those
            self.backend.encode_special_tokens = plain
            try:
                return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
            finally:
                self.backend.encode_special_tokens = False

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Any] | None = None) -> list[int]:
        """The prompt for `messages` (and the `tools` a template describes to the model). Only the chat
        template's own markup becomes special tokens; the messages' text never does, so `<|im_end|>`
        typed by a user cannot forge a turn."""
        prompt = self.apply_chat_template(messages, tools=tools)
        nonce = uuid.uuid4().hex
        markers = [f"\ue000{nonce}{i}\ue000" for i in range(len(messages))]
        skeleton = self.apply_chat_template([{**m, "content": mark} for m, mark in zip(messages, markers, strict=True)],
                                            tools=tools)
        contents = [str(m["content"]) for m in messages]
        markup, rest = [], skeleton
        for mark in markers:
            before, found, rest = rest.partition(mark)
            if not found:
                break
            markup.append(before)
        if len(markup) == len(messages) and _interleave(markup, contents) + rest == prompt:
            markup_ids = self._encode([*markup, rest], plain=False)
            content_ids = self._encode(contents, plain=True)
            ids = [i for pair in zip(markup_ids, content_ids, strict=False) for part in pair for i in part]
            return self._with_bos(ids + markup_ids[-1])
        # The template changes the contents (trims them, say): where none holds a special token's text,
        # the whole prompt may be encoded as it is.
        if any(s in text for text in contents for s in self._specials):
            raise ChatTemplateError("a message holds the text of one of the model's control tokens, which this "
                                    "model's chat template alters; remove it", param="messages")
        return self.encode(prompt)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes one token stands for: a text of n bytes is at least n / this tokens."""
        vocab = self.backend.get_vocab_size(with_added_tokens=True)
        pieces = self.backend.decode_batch([[i] for i in range(vocab)], skip_special_tokens=False)
        return max(1, *(len(piece.encode()) for piece in pieces))

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Any] | None = None) -> str:
        if self._template is None:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        bos = self.backend.id_to_token(self.bos_id) if self.bos_id is not None else ""
        eos = self.backend.id_to_token(self.eos_ids[0]) if self.eos_ids else ""
        try:
            return self._template.render(messages=list(messages), tools=list(tools) if tools else None,
                                         add_generation_prompt=True, bos_token=bos, eos_token=eos)
        except TemplateError as e:
            raise ChatTemplateError(f"the model's chat template rejected the messages: {e}", param="messages") from e


def _byte_level_bpe(tokens: list[str], merges: list[str], pre_tokenizer: Any) -> tokenizers.Tokenizer:
    """GPT-2 style BPE (`tokenizer.ggml.model` = gpt2: Llama 3, Qwen, SmolLM): merges as listed."""
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int], *,
                       add_space_prefix: bool) -> tokenizers.Tokenizer:
    """SentencePiece's BPE (`tokenizer.ggml.model` = llama: Llama 2, Mistral, Gemma) as llama.cpp runs it:
    spaces become ▁, then the adjacent pair whose join is the highest-scoring token merges first, and
    what no token covers falls back to <0xXX> byte tokens. As Hugging Face merges, every split of a token
    into two tokens, ranked by the joined token's score."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, token in enumerate(tokens):
        if types[i] in (_CONTROL, _BYTE):  # control tokens come from markup only, never from merging text
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, left, right))
    ranked.sort()
    unknown = next((t for t, ty in zip(tokens, types, strict=False) if ty == _UNKNOWN), None)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in ranked],
                                              unk_token=unknown, byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    steps = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         *steps])
    return backend


def _interleave(markup: list[str], contents: list[str]) -> str:
    return "".join(part for pair in zip(markup, contents, strict=True) for part in pair)


def _tojson(value: Any, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    """Jinja's `tojson` as Hugging Face's templates expect it: plain JSON, not escaped for HTML."""
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


def _raise_template_error(message: str) -> None:
    raise ChatTemplateError(f"the model's chat template rejected the messages: {message}", param="messages")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
