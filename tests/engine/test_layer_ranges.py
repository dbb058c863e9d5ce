"""A model cut into layer ranges and run one range after another computes exactly what the whole does."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import pytest
from shards import carve, run_in_sequence

from exo.engine.llama import LlamaShard, ModelArgs
from exo.engine.loading import LoadedModel, load

DECODE_STEPS = 3

TINY = ModelArgs(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128)


def assert_identical(whole: list[mx.array], split: list[mx.array]) -> None:
    assert len(whole) == len(split)
    for step, (a, b) in enumerate(zip(whole, split, strict=True)):
        assert a.shape == b.shape, f"step {step}"
        assert mx.array_equal(a, b).item(), f"step {step}: max abs diff {mx.abs(a - b).max().item()}"


@pytest.fixture(scope="module")
def whole_logits(smollm: LoadedModel, france_prompt: list[int]) -> list[mx.array]:
    return run_in_sequence([smollm.model], france_prompt, DECODE_STEPS)


@pytest.mark.parametrize("ranges", [
    [(0, 10), (10, 20), (20, 30)],
    [(0, 1), (1, 29), (29, 30)],
], ids=["even-thirds", "one-28-one"])
def test_real_model_split_into_ranges_gives_the_same_logits_as_the_whole(
        model_path: Path, france_prompt: list[int], whole_logits: list[mx.array],
        ranges: list[tuple[int, int]]) -> None:
    shards = [load(model_path, start, end).model for start, end in ranges]
    assert_identical(whole_logits, run_in_sequence(shards, france_prompt, DECODE_STEPS))


@pytest.mark.parametrize("tie", [True, False], ids=["tied-head", "own-head"])
@pytest.mark.parametrize("ranges", [
    [(0, 2), (2, 4)],
    [(0, 1), (1, 2), (2, 3), (3, 4)],
    [(0, 3), (3, 4)],
])
def test_tiny_model_split_into_ranges_gives_the_same_logits_as_the_whole(
        ranges: list[tuple[int, int]], tie: bool) -> None:
    mx.random.seed(0)
    whole = LlamaShard(replace(TINY, tie_word_embeddings=tie))
    mx.eval(whole.parameters())
    prompt = mx.random.randint(0, TINY.vocab_size, (9,)).tolist()
    split = [carve(whole, start, end) for start, end in ranges]
    assert_identical(run_in_sequence([whole], prompt, DECODE_STEPS), run_in_sequence(split, prompt, DECODE_STEPS))


def test_only_the_end_ranges_hold_the_embedding_and_head() -> None:
    first, middle, last = LlamaShard(TINY, 0, 1), LlamaShard(TINY, 1, 3), LlamaShard(TINY, 3, 4)
    assert (first.is_first, first.is_last) == (True, False)
    assert "embed_tokens" in first and "norm" not in first
    assert (middle.is_first, middle.is_last) == (False, False)
    assert "embed_tokens" not in middle and "norm" not in middle
    assert len(middle.layers) == 2 and len(middle.make_cache()) == 2
    assert last.is_last and "norm" in last and "embed_tokens" in last  # tied head reads the embedding


def test_middle_range_maps_hidden_states_to_hidden_states() -> None:
    middle = LlamaShard(TINY, 1, 3)
    hidden = mx.random.normal((1, 5, TINY.hidden_size))
    assert middle(hidden, middle.make_cache()).shape == (1, 5, TINY.hidden_size)


def test_default_range_is_the_whole_model() -> None:
    shard = LlamaShard(TINY)
    assert (shard.start, shard.end, shard.is_first, shard.is_last) == (0, 4, True, True)


@pytest.mark.parametrize(("start", "end"), [(0, 0), (2, 2), (3, 1), (-1, 2), (0, 5), (4, 5)])
def test_range_outside_or_empty_raises_value_error(start: int, end: int) -> None:
    with pytest.raises(ValueError, match="layer range"):
        LlamaShard(TINY, start, end)


def test_loading_a_range_past_the_real_models_last_layer_raises_value_error(model_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\[0, 30\)"):
        load(model_path, 29, 31)
