"""Pipeline-parallel generation: a model cut into layer ranges, one per process, joined in a ring.

Rank 0, the head, embeds the tokens and drives the ring; every other rank serves it. Before every
payload a fixed-size header goes around from rank 0 saying what comes next, and each rank but the
last forwards it before computing, so its neighbour knows early what to receive. The last rank
samples and sends the token on to its right neighbour, which is rank 0.

MLX's ring backend busy-polls its socket while it receives, so every rank waits in `select` until
its left socket is readable before each receive: a rank waiting for the ring then costs no CPU.

The head keeps the prefix cache (exo.engine.prefix) and tells the others what to do with their
parts of it: START names the entry to begin from and how many of its positions, END the number
to keep the request's caches under, DROP an entry to forget.
"""

from __future__ import annotations

import json
import os
import select
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import mlx.core as mx
import psutil

from exo.engine.cache import KVCache
from exo.engine.generate import PREFILL_CHUNK
from exo.engine.llama import LlamaShard
from exo.engine.prefix import PrefixCache
from exo.engine.sample import Sampler, make_sampler
from exo.shared.generation import GenerationParams

HIDDEN_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
HEADER_WORDS = 12
MICRO = 1_000_000  # sampling parameters travel as integer millionths
SIGNED = 1 << 31  # added to a signed one (a penalty) so that it travels as an unsigned word


def write_hostfile(path: Path, addresses: Sequence[str]) -> None:
    """The ring's hostfile as MLX reads it: one list of "host:port" addresses per rank, in rank order."""
    path.write_text(json.dumps([[address] for address in addresses]))


class Ring:
    """This process's place in one ring group: it receives from its left and sends to its right.

    Once an operation fails the ring is lost for good: MLX would leave later operations hanging,
    so they raise instead.
    """

    def __init__(self, group: mx.distributed.Group, left_fd: int | None) -> None:
        self.group = group
        self.left_fd = left_fd  # the socket the left neighbour sends on; None where it was not found
        self.lost: str | None = None

    @classmethod
    def join(cls, hostfile: Path, rank: int) -> Ring:
        """Connect to both neighbours; blocks until they are up (the last rank gives up after about 15 s)."""
        # MLX reads the ring only from the environment; this runs in a runner process of its own.
        os.environ["MLX_HOSTFILE"], os.environ["MLX_RANK"] = str(hostfile), str(rank)
        group = mx.distributed.init(backend="ring", strict=True)
        port = int(json.loads(hostfile.read_text())[rank][0].rsplit(":", 1)[1])
        return cls(group, _accepted_fd(port))

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    @property
    def left(self) -> int:
        return (self.rank - 1) % self.size

    @property
    def right(self) -> int:
        return (self.rank + 1) % self.size

    def wait_readable(self, timeout: float | None) -> bool:
        """Wait until something arrives from the left (or the left neighbour is gone); False on timeout."""
        if self.left_fd is None:
            return True  # MLX's own receive will wait, spinning
        readable, _, _ = select.select([self.left_fd], [], [], timeout)
        return bool(readable)

    def receive(self, shape: Sequence[int], dtype: mx.Dtype) -> mx.array:
        """The next array from the left, waited for without spinning."""
        return self._run(mx.distributed.recv(shape, dtype, self.left, group=self.group), wait=True)

    def send(self, x: mx.array) -> None:
        """Compute `x` and send it right."""
        self._run(mx.distributed.send(x, self.right, group=self.group))

    def _run(self, op: mx.array, wait: bool = False) -> mx.array:
        if self.lost is not None:
            raise RuntimeError(f"the ring was lost earlier: {self.lost}")
        if wait:
            self.wait_readable(None)
        try:
            mx.eval(op)
        except RuntimeError as e:  # "[ring] connection to a peer was lost"
            self.lost = str(e)
            raise
        return op


def _accepted_fd(port: int) -> int | None:
    """The connection our left neighbour opened to our own port: the socket we receive on."""
    fds = [c.fd for c in psutil.Process().net_connections("tcp")
           if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port]
    return fds[0] if len(fds) == 1 else None


class Op(IntEnum):
    START = 1    # a request begins: fresh caches (or n positions of prefix entry `entry`), and the sampler
    PREFILL = 2  # n prompt tokens: fill the caches, nothing comes back
    STEP = 3     # n tokens: the last rank samples from the last position and sends the token to rank 0
    END = 4      # the request is over: keep its caches as prefix entry `entry`, or drop them (0)
    CLOSE = 5    # a rank is leaving: the ranks after it stop serving, so none takes it for a lost peer
    DROP = 6     # forget prefix entry `entry`


@dataclass(frozen=True)
class Header:
    """What every rank does next; it travels as HEADER_WORDS uint32s."""

    op: Op
    n: int = 0              # PREFILL, STEP: positions in the hidden state that follows; START: reused ones
    dtype: int = 0          # PREFILL, STEP: the hidden state's dtype, an index into HIDDEN_DTYPES
    temperature: int = 0    # START: in millionths
    top_p: int = MICRO      # START: in millionths
    seed: int | None = None
    entry: int = 0          # START, END, DROP: a prefix entry's number (0: none)
    min_p: int = 0          # START: in millionths
    presence: int = 0       # START: presence_penalty in millionths, signed
    frequency: int = 0      # START: frequency_penalty in millionths, signed

    @classmethod
    def start(cls, params: GenerationParams, entry: int = 0, reused: int = 0) -> Header:
        if params.seed is not None and not 0 <= params.seed < 2**64:
            raise ValueError(f"seed {params.seed} is not in [0, 2**64)")
        return cls(Op.START, reused, temperature=round(params.temperature * MICRO), top_p=round(params.top_p * MICRO),
                   seed=params.seed, entry=entry, min_p=round(params.min_p * MICRO),
                   presence=round(params.presence_penalty * MICRO), frequency=round(params.frequency_penalty * MICRO))

    def sampler(self) -> Sampler:
        """START's sampler, as the head's request asked for it."""
        return make_sampler(self.temperature / MICRO, self.top_p / MICRO, self.seed, min_p=self.min_p / MICRO,
                            presence_penalty=self.presence / MICRO, frequency_penalty=self.frequency / MICRO)

    def encode(self) -> mx.array:
        hi, lo = divmod(self.seed or 0, 2**32)
        words = [self.op, self.n, self.dtype, self.temperature, self.top_p, self.seed is not None, lo, hi,
                 self.entry, self.min_p, self.presence + SIGNED, self.frequency + SIGNED]
        return mx.array(words, dtype=mx.uint32)

    @classmethod
    def decode(cls, words: mx.array) -> Header:
        op, n, dtype, temperature, top_p, has_seed, lo, hi, entry, min_p, presence, frequency = words.tolist()
        return cls(Op(op), n, dtype, temperature, top_p, hi << 32 | lo if has_seed else None, entry, min_p,
                   presence - SIGNED, frequency - SIGNED)


@dataclass
class Timings:
    """Where the head's time went in decode steps (one token in, one out), summed over them."""

    steps: int = 0
    compute: float = 0.0  # embedding and the head's own layers, until the hidden state is sent
    wait: float = 0.0     # for the token, once the caller asks for it: the other ranks and the links

    def add(self, compute: float, wait: float) -> None:
        self.steps, self.compute, self.wait = self.steps + 1, self.compute + compute, self.wait + wait


class PipelineHead:
    """Rank 0 of a ring: generates for a prompt, with the other ranks serving their layers."""

    def __init__(self, shard: LlamaShard, ring: Ring, prefix: PrefixCache | None = None) -> None:
        if ring.rank != 0 or ring.size < 2 or not shard.is_first or shard.is_last:
            raise ValueError(f"a pipeline head is rank 0 of a ring of 2 or more holding the first layers, "
                             f"not rank {ring.rank} of {ring.size} holding [{shard.start}, {shard.end})")
        self.shard, self.ring, self.prefix = shard, ring, prefix
        self.timings = Timings()
        self.reused = 0  # prompt positions the last request took from the prefix cache

    def generate_step(self, prompt: Sequence[int], params: GenerationParams) -> Generator[int, None, None]:
        """Yield token ids after `prompt`, forever, like `generate.generate_step`.

        A token is handed out once the next step has left this rank, so the caller works on it while
        the other ranks compute. Closing the generator finishes the step in flight and
        ends the request on every rank, so the ring is ready for the next one.
        """
        if not prompt:
            raise ValueError("the prompt is empty")
        reused = self.prefix.lookup(prompt) if self.prefix is not None else None
        self.reused = reused.n if reused else 0
        self.ring.send(Header.start(params, reused.entry if reused else 0, self.reused).encode())
        cache = reused.caches if reused else self.shard.make_cache()
        tokens = mx.array(prompt[self.reused:], dtype=mx.int32)[None]
        generated: list[int] = []
        try:
            while tokens.shape[1] > PREFILL_CHUNK:  # the same chunks as generate_step, so the same numbers
                self._forward(Op.PREFILL, tokens[:, :PREFILL_CHUNK], cache)
                tokens = tokens[:, PREFILL_CHUNK:]
            self._forward(Op.STEP, tokens, cache)
            token = self._receive_token()
            while True:
                started = time.perf_counter()
                self._forward(Op.STEP, mx.array([[token]], dtype=mx.int32), cache)
                computed = time.perf_counter() - started
                generated.append(token)
                yield token
                resumed = time.perf_counter()
                token = self._receive_token()
                self.timings.add(computed, time.perf_counter() - resumed)
        except GeneratorExit:  # closed at the yield, with a step in flight: finish it, then end the request
            self._receive_token()
            self._end([*prompt, *generated], cache)
            raise

    def _end(self, tokens: list[int], cache: list[KVCache]) -> None:
        """End the request on every rank, its caches kept as a prefix entry where the store takes them."""
        if self.prefix is None:
            self.ring.send(Header(Op.END).encode())
            return
        entry = self.prefix.store(tokens, cache)
        self.ring.send(Header(Op.END, entry=entry or 0).encode())
        for dropped in self.prefix.take_dropped():
            self.ring.send(Header(Op.DROP, entry=dropped).encode())

    def _forward(self, op: Op, tokens: mx.array, cache: list[KVCache]) -> None:
        hidden = self.shard(tokens, cache)
        # the header goes alone: two sends in one eval may leave in either order
        self.ring.send(Header(op, tokens.shape[1], HIDDEN_DTYPES.index(hidden.dtype)).encode())
        self.ring.send(hidden)

    def _receive_token(self) -> int:
        return int(self.ring.receive((1,), mx.int32).item())


def leave(ring: Ring) -> None:
    """Close the ring downstream of this rank before this process leaves it."""
    if ring.right != 0 and ring.lost is None:
        ring.send(Header(Op.CLOSE).encode())


def serve(shard: LlamaShard, ring: Ring, stop: threading.Event,
          prefixes: dict[int, list[KVCache]] | None = None) -> bool:
    """Run this rank's layers for the head until `stop` is set while no request is open, or a rank
    before this one closes the ring; returns whether one did. `prefixes` holds this rank's parts of
    the head's prefix entries, by number, from one call to the next.

    A request is never left half done, so the ring stays in step. Raises RuntimeError when a
    neighbour is lost.
    """
    cache: list[KVCache] | None = None
    sampler = make_sampler()
    prefixes = {} if prefixes is None else prefixes
    while cache is not None or not stop.is_set():
        if not ring.wait_readable(0.5):
            continue
        header = Header.decode(ring.receive((HEADER_WORDS,), mx.uint32))
        if not shard.is_last:
            ring.send(header.encode())
        if header.op == Op.CLOSE:
            return True
        if header.op == Op.START:
            if header.entry and header.entry not in prefixes:
                raise RuntimeError(f"ring out of step: prefix entry {header.entry} is not held here")
            cache = ([c.copy_prefix(header.n) for c in prefixes[header.entry]] if header.entry
                     else shard.make_cache())
            sampler = header.sampler()
        elif header.op == Op.END:
            if header.entry and cache is not None:
                prefixes[header.entry] = cache
            cache = None
        elif header.op == Op.DROP:
            prefixes.pop(header.entry, None)
        elif cache is None:
            raise RuntimeError(f"ring out of step: {header.op.name} outside a request")
        else:
            hidden = ring.receive((1, header.n, shard.args.hidden_size), HIDDEN_DTYPES[header.dtype])
            out = shard(hidden, cache, last_only=True)  # the last rank samples the last position only
            if not shard.is_last:
                ring.send(out)
            elif header.op == Op.STEP:
                ring.send(sampler(out[:, -1, :]).astype(mx.int32))
            else:
                mx.eval([c.state for c in cache])
    return False
