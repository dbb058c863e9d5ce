"""The prefix cache: a prompt that begins with key/values kept from an earlier request prefills only the
rest, and generates the same tokens as without the cache, on the real models."""

from __future__ import annotations

from contextlib import closing
from itertools import islice
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from exo.engine.cache import KVCache
from exo.engine.generate import LocalHead
from exo.engine.loading import LoadedModel, load
from exo.engine.prefix import MIN_REUSE, PrefixCache
from exo.shared.generation import GenerationParams

SYSTEM = ("You are a careful assistant for a bakery. Answer in one short sentence, name the bread when "
          "you can, and never invent prices. The shop opens at seven and closes at six; it sells rye, "
          "sourdough, baguettes and croissants, and bakes twice a day. ") * 3
QUESTIONS = ["What time do you open?", "Which breads do you sell?", "Do you bake in the afternoon?"]
N = 12


def chat(model: LoadedModel, question: str) -> list[int]:
    return model.tokenizer.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])


def generate(model: LoadedModel, prompt: list[int], prefix: PrefixCache | None) -> tuple[list[int], int]:
    """N greedy tokens after `prompt`, and how many of its positions came from `prefix`."""
    head = LocalHead(model.model, prefix)
    with closing(head.generate_step(prompt, GenerationParams(max_tokens=N))) as tokens:
        out = list(islice(tokens, N))
    return out, head.reused


@pytest.mark.parametrize("name", ["smollm", "gemma"])
def test_a_shared_system_prompt_is_computed_once_and_the_tokens_do_not_change(
        name: str, smollm: LoadedModel, gemma_path: Path) -> None:
    model = smollm if name == "smollm" else load(gemma_path)
    prompts = [chat(model, q) for q in QUESTIONS]
    shared = min(next(i for i, (a, b) in enumerate(zip(prompts[0], p, strict=False)) if a != b) for p in prompts[1:])
    assert shared > 100
    prefix = PrefixCache(budget=4096)
    for i, prompt in enumerate(prompts):
        cached, reused = generate(model, prompt, prefix)
        alone, _ = generate(model, prompt, None)
        assert cached == alone, (i, model.tokenizer.decode(cached), model.tokenizer.decode(alone))
        assert reused == (0 if i == 0 else shared)  # the first computes all; the others the question only
    # a follow-up turn finds the whole earlier conversation, its answer too
    answer, _ = generate(model, prompts[0], None)
    follow = [*prompts[0], *answer]
    cached, reused = generate(model, [*follow, *model.tokenizer.encode("\nAnd on Sundays?")], prefix)
    assert reused == len(follow)
    assert cached == generate(model, [*follow, *model.tokenizer.encode("\nAnd on Sundays?")], None)[0]


def test_lookups_copy_so_the_entry_serves_again_and_the_store_stays_within_its_budget() -> None:
    def caches(n: int) -> list[KVCache]:
        cache = KVCache()
        keys = mx.arange(n * 4, dtype=mx.float32).reshape(1, 1, n, 4)
        cache.append(keys, -keys)
        return [cache]

    prefix = PrefixCache(budget=2 * KVCache.step)
    first = list(range(100))
    prefix.store(first, caches(100))
    reused = prefix.lookup([*first[:50], 999])
    assert reused is not None and reused.n == 50
    reused.caches[0].append(mx.zeros((1, 1, 1, 4)), mx.zeros((1, 1, 1, 4)))  # the copy grows; the entry does not
    again = prefix.lookup([*first, 7])
    assert again is not None and again.n == 100
    np.testing.assert_array_equal(np.array(again.caches[0].keys[..., :100, :]).ravel(), np.arange(400))
    assert prefix.lookup(first) is not None and prefix.lookup(first).n == 99  # the last token is computed again
    assert prefix.lookup([*first[: MIN_REUSE - 1], 5]) is None  # too short a prefix to be worth a copy
    prefix.store([*first, 1, 2], caches(102))  # extends the entry, which goes
    assert len(prefix) == 1
    prefix.store(list(range(1000, 1100)), caches(100))
    prefix.store(list(range(2000, 2100)), caches(100))  # three entries of 256 positions each: the oldest goes
    assert len(prefix) == 2 and prefix.positions <= prefix.budget
    assert prefix.lookup([*first[:50], 1]) is None
    prefix.store(list(range(5000, 5600)), caches(600))  # larger than the whole budget: not kept
    assert len(prefix) == 2
