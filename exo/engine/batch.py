"""Continuous batching: the requests of a whole model in this process decoded together, one row each.

On a CPU a decode step is bound by reading the weights, and the quantized matmul unpacks each weight
once for up to 8 rows (exo.kernels), so a step for 4 sequences costs little more than a step for 1.
Each sequence keeps its own caches, sampler and position: a layer runs its matmuls over all the rows
at once and each row's attention over its own cache (exo.engine.base.attend_rotated). Every row is
computed as it is alone, so a request gets the tokens it would get by itself.

Requests join and leave between rounds. A round is one decode step for every sequence past its
prompt and the next chunk of one newcomer's prompt, so a long prompt delays the running streams by
one chunk's time a round, not by its whole prefill. As in `generate_step`, a round's tokens are
handed out while the next round computes, so the caller's work on them overlaps the model's.

The batch's caches and the prefix cache share the positions the planner counted for the instance:
a request reserves the positions its prompt and `max_tokens` can fill (at most the context), the
prefix cache gives up entries to make room, and a request with no room waits for one to end.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from exo.engine.base import LayerRange
from exo.engine.cache import KVCache
from exo.engine.generate import PREFILL_CHUNK
from exo.engine.prefix import PrefixCache
from exo.engine.sample import Sampler, sampler_for
from exo.shared.generation import GenerationParams

MAX_BATCH = 8  # rows the quantized matmul computes each as it does alone


@dataclass(eq=False)
class Member:
    """One request in the batch."""

    key: str
    prompt: tuple[int, ...]
    sampler: Sampler
    reserved: int          # positions its caches may grow to
    cache: list[KVCache] = field(default_factory=list)
    reused: int = 0        # prompt positions taken from the prefix cache
    prefilled: int = 0     # prompt tokens in the cache (reused ones included)
    generated: list[int] = field(default_factory=list)  # tokens handed out
    token: mx.array | None = None  # the next token, computed by the round before; None while prefilling

    @property
    def decoding(self) -> bool:
        return self.token is not None


@dataclass(frozen=True)
class Round:
    """What a round handed out: the next token of each sequence past its prompt, by key."""

    tokens: dict[str, int]
    prefilled: int  # prompt tokens a newcomer prefilled in it
    admitted: tuple[str, ...] = ()  # requests that left the queue for the batch at its start


class Batch:
    def __init__(self, model: LayerRange, context: int, prefix: PrefixCache | None = None,
                 max_size: int = MAX_BATCH) -> None:
        if not 1 <= max_size <= MAX_BATCH:
            raise ValueError(f"a batch holds 1 to {MAX_BATCH} sequences, not {max_size}")
        self.model, self.prefix, self.max_size = model, prefix, max_size
        self.context = _rounded(context)
        self.prefix_budget = prefix.budget if prefix is not None else 0
        self.pool = self.context + self.prefix_budget  # positions the members and the prefix cache share
        self.waiting: deque[Member] = deque()
        self.members: dict[str, Member] = {}  # admitted: prefilling, then decoding

    def __len__(self) -> int:
        return len(self.waiting) + len(self.members)

    def __contains__(self, key: str) -> bool:
        return key in self.members or any(m.key == key for m in self.waiting)

    @property
    def reserved(self) -> int:
        return sum(m.reserved for m in self.members.values())

    def join(self, key: str, prompt: Sequence[int], params: GenerationParams) -> None:
        """Queue a request; it is admitted as soon as the batch has a row and positions for it."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if key in self:
            raise ValueError(f"{key} is in the batch already")
        reserved = _rounded(max(len(prompt) + 1, min(len(prompt) + params.max_tokens, self.context)))
        self.waiting.append(Member(key, tuple(prompt), sampler_for(params), reserved))

    def leave(self, key: str, *, keep: bool = True) -> None:
        """Take a request out, its caches kept in the prefix cache where `keep` and the cache takes them
        (a failed round may have left them half written)."""
        for i, member in enumerate(self.waiting):
            if member.key == key:
                del self.waiting[i]
                return
        member = self.members.pop(key)
        if keep and self.prefix is not None and member.decoding:
            self._make_room(0)
            self.prefix.store([*member.prompt, *member.generated], member.cache)

    def clear(self) -> None:
        """Drop every request, keeping nothing."""
        self.waiting.clear()
        self.members.clear()

    def step(self) -> Round:
        """One round: admit who fits, a decode step for every sequence past its prompt, the next chunk of
        the first prompt still prefilling. Returns the tokens the round before computed."""
        admitted = self._admit()
        decoding = [m for m in self.members.values() if m.decoding]
        computed: list[mx.array] = []
        following: list[mx.array] = []
        if decoding:
            inputs = mx.concatenate([m.token for m in decoding if m.token is not None])[:, None]
            rows = (decoding[0].cache if len(decoding) == 1
                    else [[m.cache[i] for m in decoding] for i in range(len(self.model.layers))])
            logits = self.model(inputs, rows, last_only=True)[:, -1, :]
            following = [m.sampler(row) for m, row in zip(decoding, mx.split(logits, len(decoding)), strict=True)]
            computed += following
        prefilled, newcomer = 0, next((m for m in self.members.values() if not m.decoding), None)
        if newcomer is not None:
            rest = newcomer.prompt[newcomer.prefilled:]
            chunk = mx.array(rest[:PREFILL_CHUNK], dtype=mx.int32)[None]
            if len(rest) > PREFILL_CHUNK:  # the chunks generate_step takes, so the numbers it gets
                self.model(chunk, newcomer.cache)
                computed += [a for c in newcomer.cache for a in (c.state or ())]
            else:
                newcomer.token = newcomer.sampler(self.model(chunk, newcomer.cache, last_only=True)[:, -1, :])
                computed.append(newcomer.token)
            prefilled = chunk.shape[1]
            newcomer.prefilled += prefilled
        mx.async_eval(computed)
        tokens: dict[str, int] = {}
        for member, token in zip(decoding, following, strict=True):
            assert member.token is not None
            tokens[member.key] = int(member.token.item())
            member.generated.append(tokens[member.key])
            member.token = token
        return Round(tokens, prefilled, admitted)

    def _admit(self) -> tuple[str, ...]:
        admitted: list[str] = []
        while self.waiting and len(self.members) < self.max_size:
            member = self.waiting[0]
            if self.reserved + member.reserved > self.pool:
                break
            self.waiting.popleft()
            admitted.append(member.key)
            self._make_room(member.reserved)
            reused = self.prefix.lookup(member.prompt) if self.prefix is not None else None
            member.cache, member.reused = (reused.caches, reused.n) if reused else (self.model.make_cache(), 0)
            member.prefilled = member.reused
            self.members[member.key] = member
        return tuple(admitted)

    def _make_room(self, needed: int) -> None:
        """Shrink the prefix cache so that it and the members' reservations, `needed` more, fit the pool."""
        if self.prefix is not None:
            self.prefix.budget = max(0, min(self.prefix_budget, self.pool - self.reserved - needed))
            self.prefix.trim()


def _rounded(positions: int) -> int:
    """Positions as caches allocate them: in whole steps."""
    return -(-positions // KVCache.step) * KVCache.step
