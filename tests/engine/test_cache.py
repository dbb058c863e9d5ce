"""The KV cache: a prompt fed in pieces, or decoded token by token past a growth step, sees what one prefill sees."""

from __future__ import annotations

from itertools import islice

import mlx.core as mx
import pytest

from exo.engine import generate
from exo.engine.cache import KVCache
from exo.engine.generate import generate_step
from exo.engine.llama import LlamaShard, ModelArgs

TINY = ModelArgs(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128)


@pytest.fixture(scope="module")
def model() -> LlamaShard:
    mx.random.seed(0)
    model = LlamaShard(TINY)
    mx.eval(model.parameters())
    return model


def tokens(n: int, seed: int = 1) -> mx.array:
    return mx.random.randint(0, TINY.vocab_size, (1, n), key=mx.random.key(seed))


def test_cache_grows_only_when_full_and_keeps_what_was_written() -> None:
    cache, capacities = KVCache(), []
    for written in (3, KVCache.step - 3, 1, 300):
        k = mx.full((1, 2, written, 8), float(cache.offset))
        keys, values = cache.update_and_fetch(k, k + 1)
        assert keys.shape[2] == values.shape[2] == cache.offset
        assert mx.array_equal(keys[..., -written:, :], k).item()
        assert mx.array_equal(values[..., -written:, :], k + 1).item()
        assert cache.state is not None
        capacities.append(cache.state[0].shape[2])
    step = KVCache.step
    assert cache.offset == step + 1 + 300
    assert capacities[:3] == [step, step, 2 * step]  # no reallocation until the step is full
    assert capacities[3] >= cache.offset
    assert mx.array_equal(keys[..., :3, :], mx.zeros((1, 2, 3, 8))).item()  # the first write survived growth


def test_decoding_token_by_token_past_a_growth_step_matches_one_prefill(model: LlamaShard) -> None:
    prompt, start = tokens(KVCache.step + 12), KVCache.step - 4
    whole = model(prompt, model.make_cache())
    cache = model.make_cache()
    stepped = [model(prompt[:, :start], cache)]
    stepped += [model(prompt[:, i : i + 1], cache) for i in range(start, prompt.shape[1])]
    assert mx.allclose(mx.concatenate(stepped, axis=1), whole, atol=1e-4).item()


def test_prompt_fed_in_chunks_matches_one_prefill(model: LlamaShard) -> None:
    prompt = tokens(100)
    whole = model(prompt, model.make_cache())
    cache = model.make_cache()
    chunks = [model(prompt[:, a:b], cache) for a, b in [(0, 40), (40, 41), (41, 100)]]
    assert mx.allclose(mx.concatenate(chunks, axis=1), whole, atol=1e-4).item()


def test_generate_step_prefills_a_long_prompt_in_chunks_to_the_same_tokens(
        model: LlamaShard, monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = tokens(70).tolist()[0]
    unchunked = list(islice(generate_step(prompt, model, model.make_cache()), 4))
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 16)
    chunked = list(islice(generate_step(prompt, model, model.make_cache()), 4))
    assert chunked == unchunked
