"""Token generation over a whole model: a generator of token ids, and text assembled from them."""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Literal

import mlx.core as mx

from exo.engine.base import LayerRange
from exo.engine.cache import KVCache
from exo.engine.prefix import PrefixCache
from exo.engine.sample import Sampler, make_sampler, sampler_for
from exo.engine.tokenizer import Tokenizer
from exo.shared.generation import GenerationParams

FinishReason = Literal["stop", "length"]

PREFILL_CHUNK = 512


def generate_step(prompt: Sequence[int], model: LayerRange, cache: list[KVCache], *,
                  sampler: Sampler | None = None) -> Iterator[int]:
    """Yield token ids after `prompt`, forever; the caller decides when to stop.

    The next step is queued with `mx.async_eval` before the current token is handed out, so the
    model computes while the caller detokenizes.
    """
    sampler = sampler or make_sampler()
    tokens = mx.array(prompt, dtype=mx.int32)[None]
    while tokens.shape[1] > PREFILL_CHUNK:
        model(tokens[:, :PREFILL_CHUNK], cache)
        mx.eval([c.state for c in cache])
        tokens = tokens[:, PREFILL_CHUNK:]

    def step(inputs: mx.array) -> mx.array:
        return sampler(model(inputs, cache, last_only=True)[:, -1, :])

    token = step(tokens)
    mx.async_eval(token)
    while True:
        following = step(token[:, None])
        mx.async_eval(following)
        yield int(token.item())
        token = following


class LocalHead:
    """A whole model in this process, with its prefix cache: what a PipelineHead is for a ring."""

    def __init__(self, model: LayerRange, prefix: PrefixCache | None = None) -> None:
        self.model, self.prefix = model, prefix
        self.reused = 0  # prompt positions the last request took from the prefix cache

    def generate_step(self, prompt: Sequence[int], params: GenerationParams) -> Generator[int, None, None]:
        """Token ids after `prompt`, forever, from the longest prefix the prefix cache holds; what the
        request computed is kept there once it is closed (not after a failure, which may leave the
        caches half written)."""
        reused = self.prefix.lookup(prompt) if self.prefix is not None else None
        cache, self.reused = (reused.caches, reused.n) if reused else (self.model.make_cache(), 0)
        generated: list[int] = []
        try:
            steps = generate_step(prompt[self.reused:], self.model, cache, sampler=sampler_for(params))
            with closing(steps):
                for token in steps:
                    generated.append(token)
                    yield token
        except GeneratorExit:
            if self.prefix is not None:
                self.prefix.store([*prompt, *generated], cache)
            raise


@dataclass(frozen=True)
class Delta:
    """A piece of generated text; the last one of a generation carries its finish reason."""

    text: str
    n_tokens: int
    finish_reason: FinishReason | None = None
    cached_tokens: int = 0  # with the finish reason: prompt tokens whose key/values were kept from before
    stop_sequence: str | None = None  # with the finish reason: the stop string that ended the text, if one did


class TextAssembler:
    """Turns token ids into text deltas: whole UTF-8 characters only, stop strings cut out."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self._borders = [_borders(s) for s in self.stop]
        self.ids: list[int] = []
        self.prefix = 0     # ids[prefix:committed] are decoded again as context for the next ones
        self.committed = 0  # ids before this index are part of `text`
        self.text = ""      # all text decoded so far
        self.emitted = 0    # how much of it was handed out
        self.stopped_by: str | None = None  # the stop string reached, once one is

    def add(self, token: int) -> tuple[str, bool]:
        """Add a token; return the text now safe to emit and whether a stop string was reached."""
        self.ids.append(token)
        # Decode with one committed token of context so tokenizers that strip a leading space don't.
        context = self.tokenizer.decode(self.ids[self.prefix:self.committed])
        fresh = self.tokenizer.decode(self.ids[self.prefix:])
        if fresh.endswith("\ufffd"):  # a multi-byte character is still incomplete
            return "", False
        self.text += fresh[len(context):]
        self.prefix, self.committed = len(self.ids) - 1, len(self.ids)
        # cut at the earliest stop string, whichever of them it is
        found = [(at, stop) for stop in self.stop
                 if (at := self.text.find(stop, max(0, self.emitted - len(stop)))) != -1]
        if found:
            at, self.stopped_by = min(found)
            return self._emit(at), True
        return self._emit(len(self.text) - self._held_back()), False

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string: for each
        stop string, a Knuth-Morris-Pratt scan of as much of the tail as could match, O(its length)."""
        held = 0
        for stop, borders in zip(self.stop, self._borders, strict=True):
            matched = 0  # the longest prefix of `stop` that ends the text scanned so far; never all of it
            for char in self.text[max(0, len(self.text) - len(stop) + 1):]:
                while matched and stop[matched] != char:
                    matched = borders[matched - 1]
                matched += stop[matched] == char
            held = max(held, matched)
        return held

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        out, self.emitted = self.text[self.emitted:end], end
        return out


def _borders(stop: str) -> list[int]:
    """KMP's failure table: for each prefix of `stop`, the longest proper prefix that is also its suffix."""
    table, k = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = table[k - 1]
        k += stop[i] == stop[k]
        table[i] = k
    return table


def generate_text(prompt: Sequence[int], model: LayerRange, tokenizer: Tokenizer, params: GenerationParams,
                  cache: list[KVCache]) -> Iterator[Delta]:
    """Generate text for `prompt` with a model held whole in this process."""
    sampler = sampler_for(params)
    return detokenize(generate_step(prompt, model, cache, sampler=sampler), tokenizer, params)


class Detokenizer:
    """Text from token ids given one at a time, until an end token, a stop string or `max_tokens`: `add`
    returns the Delta a token makes, if it makes text or ends the generation (`finished` then)."""

    def __init__(self, tokenizer: Tokenizer, params: GenerationParams) -> None:
        self.eos_ids, self.max_tokens = tokenizer.eos_ids, params.max_tokens
        self.text = TextAssembler(tokenizer, params.stop)
        self.n = 0
        self.finished = False

    def add(self, token: int) -> Delta | None:
        self.n += 1
        delta = self._delta(token)
        self.finished = delta is not None and delta.finish_reason is not None
        return delta

    def _delta(self, token: int) -> Delta | None:
        if token in self.eos_ids:
            return Delta(self.text.flush(), self.n, "stop")
        piece, stopped = self.text.add(token)
        if stopped:
            return Delta(piece, self.n, "stop", stop_sequence=self.text.stopped_by)
        if self.n >= self.max_tokens:
            return Delta(piece + self.text.flush(), self.n, "length")
        return Delta(piece, self.n) if piece else None


def detokenize(tokens: Iterator[int], tokenizer: Tokenizer, params: GenerationParams) -> Iterator[Delta]:
    """Text from a stream of token ids (see Detokenizer).

    The token stream is closed when the text ends, however it ends, so a pipeline can finish the
    step it has in flight.
    """
    text = Detokenizer(tokenizer, params)
    try:
        for token in tokens:
            if (delta := text.add(token)) is not None:
                yield delta
            if text.finished:
                return
    finally:
        if isinstance(tokens, Generator):
            tokens.close()
