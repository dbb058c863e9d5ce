"""The KV cache: a prompt fed in pieces, or decoded token by token past a growth step, sees what one prefill sees."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import mlx.core as mx
import pytest

from exo.engine import generate
from exo.engine.cache import KVCache
from exo.engine.generate import generate_step
from exo.engine.llama import LlamaShard, ModelArgs
from exo.engine.loading import LoadedModel, load

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
        keys, values = (a[..., : cache.offset, :] for a in cache.append(k, k + 1))
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


def test_a_float16_cache_holds_half_the_bytes_and_decodes_as_a_float32_one_does(model: LlamaShard) -> None:
    prompt, start = tokens(40, seed=3), 30
    wide = model(prompt, model.make_cache())
    model.cache_dtype = mx.float16
    try:
        cache = model.make_cache()
        halved = [model(prompt[:, :start], cache)]  # a prefill, then one position at a time
        halved += [model(prompt[:, i : i + 1], cache) for i in range(start, prompt.shape[1])]
    finally:
        model.cache_dtype = None
    assert all(c.state is not None and c.state[0].dtype == c.state[1].dtype == mx.float16 for c in cache)
    halved_logits = mx.concatenate(halved, axis=1)
    assert halved_logits.dtype == mx.float32
    # keys and values rounded to float16 (11 significant bits) move the logits by rounding only
    assert mx.allclose(halved_logits, wide, atol=2e-2).item(), mx.abs(halved_logits - wide).max().item()


def test_the_real_model_loaded_with_a_float16_cache_answers_as_with_a_float32_one(
        smollm: LoadedModel, model_path: Path) -> None:
    halved = load(model_path, kv_cache="float16")
    assert halved.model.make_cache()[0].dtype == mx.float16
    prompt = smollm.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    steps = [generate_step(prompt, m.model, m.model.make_cache()) for m in (smollm, halved)]
    wide, half = ([next(s) for _ in range(24)] for s in steps)
    for s in steps:
        s.close()
    assert half == wide, (smollm.tokenizer.decode(wide), smollm.tokenizer.decode(half))
