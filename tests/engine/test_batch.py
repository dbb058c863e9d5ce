"""Continuous batching on the real models: every request gets, token for token, what it gets alone, whoever
shares its rounds, whenever it joins, however it leaves."""

from __future__ import annotations

from contextlib import closing
from itertools import islice
from pathlib import Path

import pytest

from exo.engine.batch import MAX_BATCH, Batch
from exo.engine.generate import PREFILL_CHUNK, LocalHead
from exo.engine.loading import LoadedModel, load
from exo.engine.prefix import PrefixCache
from exo.shared.generation import GenerationParams

QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "Count from one to ten.",
             "Name three rivers in Europe and say which sea each flows into."]
PARAMS = [GenerationParams(max_tokens=24),
          GenerationParams(max_tokens=17, temperature=0.8, seed=3),
          GenerationParams(max_tokens=30, presence_penalty=0.6, frequency_penalty=0.3),
          GenerationParams(max_tokens=21, temperature=0.7, top_p=0.9, min_p=0.05, seed=11)]


def alone(model: LoadedModel, prompt: list[int], params: GenerationParams) -> list[int]:
    head = LocalHead(model.model)
    with closing(head.generate_step(prompt, params)) as tokens:
        return list(islice(tokens, params.max_tokens))


def run(batch: Batch, requests: dict[str, tuple[list[int], GenerationParams]], *,
        joining: dict[int, list[str]] | None = None, leaving: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Drive the batch: the requests not in `joining` join at once, the others at the round it names;
    each leaves after its max_tokens, or after the tokens `leaving` names for it."""
    joining = joining or {}
    later = {key for keys in joining.values() for key in keys}
    for key in requests.keys() - later:
        batch.join(key, *requests[key])
    got: dict[str, list[int]] = {key: [] for key in requests}
    rounds = 0
    while len(batch) or any(r >= rounds for r in joining):
        for key in joining.get(rounds, []):
            batch.join(key, *requests[key])
        rounds += 1
        for key, token in batch.step().tokens.items():
            got[key].append(token)
            if len(got[key]) == (leaving or {}).get(key, requests[key][1].max_tokens):
                batch.leave(key)
    return got


def prompts(model: LoadedModel) -> list[list[int]]:
    return [model.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.mark.parametrize("name", ["smollm", "gemma"])
def test_requests_decoded_together_get_their_own_tokens(name: str, smollm: LoadedModel, gemma_path: Path) -> None:
    model = smollm if name == "smollm" else load(gemma_path)
    requests = {str(i): (p, params) for i, (p, params) in enumerate(zip(prompts(model), PARAMS, strict=True))}
    want = {key: alone(model, *request) for key, request in requests.items()}
    # two start, two join later (mixed prompt lengths, max_tokens and sampling)
    got = run(Batch(model.model, 4096), requests, joining={3: ["2"], 7: ["3"]})
    assert got == want


def test_a_long_prompt_joins_in_chunks_while_the_others_keep_decoding(smollm: LoadedModel) -> None:
    long = smollm.tokenizer.encode_chat([{"role": "user", "content": "Summarize: " + "the river runs on. " * 220}])
    assert len(long) > 2 * PREFILL_CHUNK
    requests = {"short": (prompts(smollm)[0], GenerationParams(max_tokens=30)),
                "long": (long, GenerationParams(max_tokens=8))}
    batch = Batch(smollm.model, 4096)
    batch.join("short", *requests["short"])
    got: dict[str, list[int]] = {"short": [], "long": []}
    chunks = []
    while len(batch):
        if len(got["short"]) == 2 and "long" not in batch and not got["long"]:
            batch.join("long", *requests["long"])
        done = batch.step()
        chunks.append((done.prefilled, "short" in done.tokens))
        for key, token in done.tokens.items():
            got[key].append(token)
            if len(got[key]) == requests[key][1].max_tokens:
                batch.leave(key)
    assert got == {key: alone(smollm, *request) for key, request in requests.items()}
    # after the short one's own prompt, the long one's went in one chunk a round, beside a token of the short one
    whole, rest = divmod(len(long), PREFILL_CHUNK)
    assert [n for n, _ in chunks[1:] if n] == [PREFILL_CHUNK] * whole + [rest]
    assert all(short_went_on for n, short_went_on in chunks[1:] if n)


def test_one_leaving_early_leaves_the_others_intact(smollm: LoadedModel) -> None:
    requests = {str(i): (p, params) for i, (p, params) in enumerate(zip(prompts(smollm), PARAMS, strict=True))}
    got = run(Batch(smollm.model, 4096), requests, leaving={"0": 3, "2": 5})  # cancelled after 3 and 5 tokens
    want = {key: alone(smollm, *request) for key, request in requests.items()}
    assert got["0"] == want["0"][:3] and got["2"] == want["2"][:5]
    assert got["1"] == want["1"] and got["3"] == want["3"]


def test_the_prefix_cache_serves_batched_requests_the_same_tokens(smollm: LoadedModel) -> None:
    system = "You answer questions about geography in one short sentence, naming the place. " * 4
    chats = [smollm.tokenizer.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": q}])
             for q in QUESTIONS]
    batch = Batch(smollm.model, 4096, PrefixCache(4096))
    first = run(batch, {"first": (chats[0], GenerationParams(max_tokens=10))})
    rest = {str(i): (chat, GenerationParams(max_tokens=12)) for i, chat in enumerate(chats[1:])}
    batch.join("probe", chats[1], GenerationParams(max_tokens=1))
    batch.step()
    assert batch.members["probe"].reused > 50  # the system prompt came from the cache
    batch.leave("probe")
    got = run(batch, rest)
    assert first["first"] == alone(smollm, chats[0], GenerationParams(max_tokens=10))
    assert got == {key: alone(smollm, *request) for key, request in rest.items()}


def test_requests_wait_for_a_row_and_for_positions(smollm: LoadedModel) -> None:
    prompt = prompts(smollm)[0]
    batch = Batch(smollm.model, 4096, max_size=2)
    for key in "abc":
        batch.join(key, prompt, GenerationParams(max_tokens=4))
    batch.step()
    assert set(batch.members) == {"a", "b"} and len(batch) == 3  # c waits for a row
    # a context of 512 positions and a prefix cache as big: two requests that may fill 512 each, one at a time
    prefix = PrefixCache(512)
    batch = Batch(smollm.model, 512, prefix)
    batch.join("x", prompt, GenerationParams(max_tokens=500))
    batch.join("y", prompt, GenerationParams(max_tokens=500))
    batch.join("z", prompt, GenerationParams(max_tokens=500))
    batch.step()
    assert set(batch.members) == {"x", "y"} and prefix.budget == 0  # the prefix cache gave its positions up
    batch.leave("x")
    batch.step()
    assert set(batch.members) == {"y", "z"}


def test_a_batch_holds_up_to_the_rows_the_kernels_keep_apart(smollm: LoadedModel) -> None:
    with pytest.raises(ValueError, match="1 to 8"):
        Batch(smollm.model, 4096, max_size=MAX_BATCH + 1)
    batch = Batch(smollm.model, 4096)
    batch.join("a", [1, 2, 3], GenerationParams(max_tokens=2))
    with pytest.raises(ValueError, match="in the batch already"):
        batch.join("a", [1, 2, 3], GenerationParams(max_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        batch.join("b", [], GenerationParams(max_tokens=2))
