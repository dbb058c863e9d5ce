"""Generation: the real model answers, limits and stop strings end it, and text comes out whole."""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import islice
from typing import cast

import pytest

from exo.engine.generate import Delta, GenerationParams, TextAssembler, generate_step, generate_text
from exo.engine.loading import LoadedModel
from exo.engine.tokenizer import Tokenizer

MAX_ANSWER = 16


def generate(smollm: LoadedModel, prompt: list[int], params: GenerationParams) -> list[Delta]:
    return list(generate_text(prompt, smollm.model, smollm.tokenizer, params, smollm.model.make_cache()))


@pytest.fixture(scope="module")
def greedy_tokens(smollm: LoadedModel, france_prompt: list[int]) -> list[int]:
    """The greedy answer's token ids straight from generate_step, up to and including the end token."""
    tokens = []
    steps = generate_step(france_prompt, smollm.model, smollm.model.make_cache())
    for token in islice(steps, MAX_ANSWER):
        tokens.append(token)
        if token in smollm.tokenizer.eos_ids:
            break
    steps.close()
    return tokens


@pytest.fixture(scope="module")
def greedy_answer(smollm: LoadedModel, france_prompt: list[int]) -> list[Delta]:
    return generate(smollm, france_prompt, GenerationParams(max_tokens=MAX_ANSWER))


def test_greedy_answer_to_the_capital_of_france_names_paris(greedy_answer: list[Delta]) -> None:
    assert "Paris" in "".join(d.text for d in greedy_answer)


def test_answer_ends_at_the_end_token_with_finish_reason_stop(
        greedy_answer: list[Delta], greedy_tokens: list[int], smollm: LoadedModel) -> None:
    assert greedy_tokens[-1] in smollm.tokenizer.eos_ids
    assert greedy_answer[-1].finish_reason == "stop"
    assert greedy_answer[-1].n_tokens == len(greedy_tokens)
    assert all(d.finish_reason is None for d in greedy_answer[:-1])


def test_deltas_join_to_the_decoded_tokens(
        greedy_answer: list[Delta], greedy_tokens: list[int], smollm: LoadedModel) -> None:
    assert "".join(d.text for d in greedy_answer) == smollm.tokenizer.decode(greedy_tokens)
    counts = [d.n_tokens for d in greedy_answer]
    assert counts == sorted(counts)


def test_max_tokens_ends_with_finish_reason_length_after_exactly_that_many_tokens(
        smollm: LoadedModel, france_prompt: list[int], greedy_tokens: list[int]) -> None:
    deltas = generate(smollm, france_prompt, GenerationParams(max_tokens=3))
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].n_tokens == 3
    assert "".join(d.text for d in deltas) == smollm.tokenizer.decode(greedy_tokens[:3])


def test_stop_string_cuts_the_text_before_it_with_finish_reason_stop(
        smollm: LoadedModel, france_prompt: list[int], greedy_tokens: list[int]) -> None:
    full = smollm.tokenizer.decode(greedy_tokens)
    stop = " France"  # a whole token of the answer, with more of the answer after it
    deltas = generate(smollm, france_prompt, GenerationParams(max_tokens=MAX_ANSWER, stop=(stop,)))
    text = "".join(d.text for d in deltas)
    assert text == full[:full.index(stop)]
    assert deltas[-1].finish_reason == "stop"
    assert all(stop not in d.text for d in deltas)


def test_seeded_sampling_generates_the_same_text_twice(smollm: LoadedModel) -> None:
    prompt = smollm.tokenizer.encode("Once upon a time")  # short: any prompt shows the seed at work
    params = GenerationParams(max_tokens=6, temperature=0.9, top_p=0.95, seed=11)
    first, second = generate(smollm, prompt, params), generate(smollm, prompt, params)
    assert first == second and first[-1].n_tokens <= 6


class ByteTokenizer:
    """Each id stands for a fixed byte string; broken UTF-8 decodes to U+FFFD as real tokenizers do."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self.pieces = pieces

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def assemble(pieces: Sequence[bytes], stop: Sequence[str] = ()) -> tuple[list[str], bool]:
    """Feed every piece to a TextAssembler; the text it hands out, and whether it met a stop string."""
    text = TextAssembler(cast(Tokenizer, ByteTokenizer(pieces)), stop)
    out = []
    for token in range(len(pieces)):
        piece, stopped = text.add(token)
        out.append(piece)
        if stopped:
            return out, True
    out.append(text.flush())
    return out, False


def test_assembler_hands_out_plain_text_as_it_comes() -> None:
    out, stopped = assemble([b"Hello", b",", b" world"])
    assert out == ["Hello", ",", " world", ""] and not stopped


def test_stop_string_split_across_tokens_is_cut_out() -> None:
    out, stopped = assemble([b"The answer", b" is ST", b"OP", b" never seen"], stop=["STOP"])
    assert stopped
    assert "".join(out) == "The answer is "
    assert all("ST" not in piece for piece in out)  # the would-be start of the stop string was held back


def test_held_back_text_that_is_no_stop_string_comes_out_later() -> None:
    out, stopped = assemble([b"a S", b"T", b"x"], stop=["STOP"])
    assert not stopped
    assert out == ["a ", "", "STx", ""]


def test_stop_string_at_the_very_start_gives_no_text() -> None:
    out, stopped = assemble([b"STOP and more"], stop=["STOP"])
    assert stopped and out == [""]


def test_earliest_of_several_stop_strings_cuts_the_text() -> None:
    out, stopped = assemble([b"Hello"], stop=["lo", "el"])
    assert stopped and "".join(out) == "H"


def test_empty_stop_strings_are_ignored() -> None:
    out, stopped = assemble([b"abc"], stop=[""])
    assert not stopped and "".join(out) == "abc"


def test_multi_byte_characters_split_across_tokens_come_out_whole() -> None:
    e, ni, party = "é".encode(), "日".encode(), "🎉".encode()
    pieces = [b"caf" + e[:1], e[1:] + b" ", ni[:1], ni[1:] + "本 ".encode(), party[:1], party[1:2], party[2:] + b"!"]
    out, _ = assemble(pieces)
    assert out == ["", "café ", "", "日本 ", "", "", "🎉!", ""]


def test_multi_byte_character_completes_a_stop_string() -> None:
    raw = "ok 日本".encode()
    out, stopped = assemble([raw[:4], raw[4:-1], raw[-1:]], stop=["日本"])
    assert stopped and "".join(out) == "ok " and all("\ufffd" not in piece for piece in out)


def held_back_by_definition(text: str, stops: list[str]) -> int:
    """The longest tail of `text` (none of it a whole stop string) that some stop string begins with."""
    return max((n for n in range(1, len(text) + 1) for s in stops if len(s) > n and s.startswith(text[-n:])),
               default=0)


def test_held_back_text_is_the_longest_tail_that_could_grow_into_a_stop_string() -> None:
    rng = random.Random(12)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        if any(s in text for s in stops):
            continue
        assembler = TextAssembler(cast(Tokenizer, ByteTokenizer([])), stops)
        assembler.text = text
        assert assembler._held_back() == held_back_by_definition(text, stops), (text, stops)


def test_stop_string_that_repeats_its_own_start_is_cut_where_it_begins() -> None:
    out, stopped = assemble([b"x a", b"a", b"a", b"b tail"], stop=["aab"])
    assert stopped and "".join(out) == "x a"
