"""Key/value prefixes kept between requests, so a request that begins with tokens already computed (a
shared system prompt, the earlier turns of a chat) prefills only the rest.

An entry is the caches a request left behind and the tokens they hold. A lookup copies the longest
prefix any entry shares with the new prompt into fresh caches, so entries are never changed by the
requests that use them and one entry serves any number of them. The store is bounded by positions
held (each entry counts its caches' capacity), least recently used out first.

In a pipeline every rank holds its own layers' part of each entry. Only the head sees tokens, so
it keeps the store and names each entry by a number; the other ranks keep their parts under those
numbers and copy, keep and drop them as the head says (exo.engine.pipeline).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from exo.engine.cache import KVCache

# Fewer positions than this are quicker to compute again than to look up and copy.
MIN_REUSE = 16


@dataclass(frozen=True)
class _Entry:
    id: int
    tokens: tuple[int, ...]
    caches: list[KVCache]

    @property
    def positions(self) -> int:
        return self.caches[0].capacity if self.caches else 0  # every layer's cache holds as many


@dataclass(frozen=True)
class Reused:
    """Caches holding the first `n` positions of a prompt, ready for the rest of it, copied from entry `entry`."""

    caches: list[KVCache]
    n: int
    entry: int


class PrefixCache:
    def __init__(self, budget: int) -> None:
        self.budget = budget  # positions the entries may hold together
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()  # least recently used first
        self._next_id = 1
        self._dropped: list[int] = []

    @property
    def positions(self) -> int:
        return sum(e.positions for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: Sequence[int]) -> Reused | None:
        """Fresh caches holding the longest prefix of `prompt` an entry has, short of its last token (whose
        logits the request needs); None when no entry shares at least MIN_REUSE tokens."""
        best, n = None, 0
        for entry in self._entries.values():
            shared = _common_prefix(entry.tokens, prompt, len(prompt) - 1)
            if shared > n:
                best, n = entry, shared
        if best is None or n < MIN_REUSE:
            return None
        self._entries.move_to_end(best.tokens)
        return Reused([c.copy_prefix(n) for c in best.caches], n, best.id)

    def store(self, tokens: Sequence[int], caches: list[KVCache]) -> int | None:
        """Keep `caches`, which hold the key/values of `tokens` (those past the caches' offset are
        left out); the entry's number, or None where it is not kept. Entries it extends are dropped:
        it answers every lookup they would."""
        held = tuple(tokens[: caches[0].offset]) if caches else ()
        entry = _Entry(self._next_id, held, caches)
        if len(held) < MIN_REUSE or entry.positions > self.budget:
            return None
        self._next_id += 1
        for tokens_held in [t for t in self._entries if held[: len(t)] == t]:
            self._dropped.append(self._entries.pop(tokens_held).id)
        self._entries[held] = entry
        self.trim()
        return entry.id

    def trim(self) -> None:
        """Drop the least recently used entries until the rest fit the budget (which its owner may lower)."""
        while self.positions > self.budget:
            self._dropped.append(self._entries.popitem(last=False)[1].id)

    def take_dropped(self) -> list[int]:
        """The numbers of the entries dropped since the last call."""
        dropped, self._dropped = self._dropped, []
        return dropped


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
