"""Which node holds which layers: a pure function from a model and node profiles to layer ranges.

The planner takes the fewest nodes that can hold the model, largest offered memory first, and splits
the layers into contiguous half-open ranges in proportion to each node's usable memory. What a model
takes is its weights as loaded and the key/value cache of the context its instance serves, in every
layer, and as much again for the prefix cache its runners keep (`instance_bytes`). Bad arguments
(a card with no layers, no bytes, `min_nodes < 1`) are the caller's bug and raise ValueError;
a cluster that cannot hold the model raises PlacementRefused, saying how much memory is missing.

What a node offers is measured now, and runners of instances just placed have not loaded yet: so what
those runners will take is counted against it, and what every instance placed takes is counted against
all a node may give exo (its cap, or all its memory).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Protocol

from exo.shared.errors import PlacementRefused
from exo.shared.runners import RunnerStatus, runner_id
from exo.shared.state import Instance, NodeProfile, ShardAssignment, State
from exo.shared.types import CacheDtype, Dtype, NodeId, cache_value_bytes

# Weights and the key/value cache are not all a node needs: activations and allocator slack grow with
# the work, so a tenth of what a node offers stays free, plus a fixed reserve for the runner process
# itself (interpreter, MLX, tokenizer), which does not shrink on a small node.
HEADROOM_FRACTION = 0.1
RESERVE_BYTES = 128 * 1024**2
# Positions (prompt and completion) an instance serves unless --context says otherwise, within the
# model's own: llama.cpp's server and Ollama default to the same.
DEFAULT_CONTEXT = 4096
# A runner in these states holds its weights, so the memory available now already shows them.
_HOLDING_WEIGHTS = (RunnerStatus.LOADED, RunnerStatus.WARMING_UP, RunnerStatus.READY, RunnerStatus.RUNNING)

_GB = 1_000_000_000


class Placeable(Protocol):
    """What the planner needs of a model: a registry card, or a node's own model as it advertises it."""

    @property
    def id(self) -> str: ...

    @property
    def n_layers(self) -> int: ...

    @property
    def kv_width(self) -> int: ...  # keys and values one position adds to one layer's cache

    @property
    def context_length(self) -> int: ...

    def memory_bytes(self, dtype: Dtype) -> int: ...


def instance_bytes(model: Placeable, context: int, dtype: Dtype, kv_cache: CacheDtype | None) -> int:
    """Memory an instance of `model` takes over all its nodes: the weights as `dtype` holds them, a
    key/value cache of `context` positions in every layer (which grows to that as a request runs), and
    the same again for the prefix cache its runners keep (exo.engine.prefix)."""
    cache = model.n_layers * model.kv_width * context * cache_value_bytes(dtype, kv_cache)
    return model.memory_bytes(dtype) + 2 * cache


def max_nodes_for(model_bytes: int) -> int:
    """How many nodes a model of this size may be spread over voluntarily (see `previews`)."""
    if model_bytes < 2 * _GB:
        return 1
    return 2 if model_bytes <= 10 * _GB else 4


def usable_bytes(node: NodeProfile) -> int:
    """Bytes of weights a node can take while keeping its headroom."""
    return max(0, _headroom_left(node))


def _headroom_left(node: NodeProfile) -> int:
    """What a node offers less its headroom; negative when it offers less than the reserve."""
    return int(node.memory_offered * (1 - HEADROOM_FRACTION)) - RESERVE_BYTES


def committed_bytes(
    state: State, model_bytes: Callable[[Instance], int | None]
) -> tuple[dict[NodeId, int], dict[NodeId, int]]:
    """Offered memory each node has given to the instances placed in `state`, and the part of it whose
    runners have not loaded yet (so memory available now does not show it). Each shard takes its share
    of what its instance takes (`model_bytes`, see `instance_bytes`) with that share's headroom, and a
    runner's reserve (only that where the model's size is unknown)."""
    committed: dict[NodeId, int] = {}
    loading: dict[NodeId, int] = {}
    for instance in state.instances.values():
        size = model_bytes(instance) or 0
        for shard in instance.shards:
            share = _offered_for(size * (shard.end - shard.start) // max(instance.n_layers, 1))
            committed[shard.node_id] = committed.get(shard.node_id, 0) + share
            runner = state.runners.get(runner_id(instance.instance_id, shard.rank))
            if runner is None or runner.status not in _HOLDING_WEIGHTS:
                loading[shard.node_id] = loading.get(shard.node_id, 0) + share
    return committed, loading


def _uncommitted(nodes: Sequence[NodeProfile], committed: Mapping[NodeId, int],
                 loading: Mapping[NodeId, int]) -> list[NodeProfile]:
    """The nodes as offering what is available now less what runners still loading will take, within
    what placed instances leave of all the node may give exo (its cap, or all its memory)."""
    out = []
    for node in nodes:
        if taken := committed.get(node.node_id, 0):
            budget = node.memory_cap or node.memory_total
            left = min(node.memory_offered - loading.get(node.node_id, 0), budget - taken)
            node = node.model_copy(update={"memory_available": max(0, left), "memory_cap": None})
        out.append(node)
    return out


def allocate_layers(n_layers: int, weights: Sequence[float]) -> list[int]:
    """Split `n_layers` in proportion to `weights` (largest remainder), each share at least 1 layer."""
    if not weights or n_layers < len(weights):
        raise ValueError(f"cannot give {len(weights)} shares at least one of {n_layers} layers")
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise ValueError(f"weights must be positive and finite, got {list(weights)}")
    exact = [Fraction(w) for w in weights]  # exact arithmetic: the same split on every machine
    quotas = [n_layers * w / sum(exact) for w in exact]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(counts)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: n_layers - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):
        if counts[i] == 0:  # too small a share to round up: take a layer from the largest
            counts[max(range(len(counts)), key=lambda j: (counts[j], -j))] -= 1
            counts[i] = 1
    return counts


def place(
    model: Placeable, nodes: Sequence[NodeProfile], *, model_bytes: int, min_nodes: int = 1,
    committed: Mapping[NodeId, int] | None = None, loading: Mapping[NodeId, int] | None = None,
    context: int | None = None,
) -> tuple[ShardAssignment, ...]:
    """Layer ranges on the fewest nodes (at least `min_nodes`) that hold `model_bytes` (what the instance
    takes, weights and caches: `instance_bytes` for a context of `context` positions), besides what
    instances already placed have `committed` there, `loading` of it not loaded yet (see
    `committed_bytes`)."""
    _check(model, model_bytes)
    taken = sum((committed or {}).get(node.node_id, 0) for node in nodes)
    nodes = _uncommitted(nodes, committed or {}, loading or {})
    if min_nodes < 1:
        raise ValueError(f"min_nodes must be at least 1, got {min_nodes}")
    n = model.n_layers
    if not nodes:
        need = _offered_for(model_bytes)
        raise PlacementRefused(
            f"no nodes to place {model.id} on: it needs {_human(need)} of free memory; "
            "start exo on a machine that has it"
        )
    if min_nodes > len(nodes):
        raise PlacementRefused(
            f"{model.id} was asked to span {min_nodes} nodes but the cluster has {len(nodes)}; "
            f"start exo on {min_nodes - len(nodes)} more machine(s) or ask for fewer nodes"
        )
    if min_nodes > n:
        raise PlacementRefused(
            f"{model.id} has {n} layer(s) and each node needs at least one, so it cannot span "
            f"{min_nodes} nodes; ask for at most {n}"
        )
    ranked = _ranked(nodes)
    most = min(len(ranked), n)
    for k in range(min_nodes, most + 1):
        if placement := _place_on(ranked[:k], n, model_bytes):
            return placement
    missing = min(_shortfall(ranked[:k], n, model_bytes) for k in range(min_nodes, most + 1))
    capped = f" (a {n}-layer model can use at most {n} node(s))" if len(ranked) > n else ""
    placed = f" and the {_human(taken)} that instances already placed take" if taken else ""
    delete = "delete an instance (DELETE /instance/ID), " if taken else ""
    what = f"its weights and key/value caches for {context} tokens" if context else "its weights"
    shorter = ", lower --context" if context else ""
    raise PlacementRefused(
        f"{model.id} ({_human(model_bytes)}: {what}) does not fit on {most} node(s){capped}: "
        f"it needs {_human(missing)} more free memory, counting headroom{placed}; "
        f"{delete}free memory, raise --max-memory{shorter}, or add a machine"
    )


def previews(
    model: Placeable, nodes: Sequence[NodeProfile], *, model_bytes: int,
    committed: Mapping[NodeId, int] | None = None, loading: Mapping[NodeId, int] | None = None,
) -> list[tuple[ShardAssignment, ...]]:
    """One placement per node count, from the fewest that fit up to what the model's size allows."""
    _check(model, model_bytes)
    ranked = _ranked(_uncommitted(nodes, committed or {}, loading or {}))
    fitting = {
        k: placement
        for k in range(1, min(len(ranked), model.n_layers) + 1)
        if (placement := _place_on(ranked[:k], model.n_layers, model_bytes))
    }
    if not fitting:
        return []
    upto = max(min(fitting), max_nodes_for(model_bytes))
    return [placement for k, placement in fitting.items() if k <= upto]


def _check(model: Placeable, model_bytes: int) -> None:
    if model.n_layers < 1:
        raise ValueError(f"model card {model.id} has {model.n_layers} layers; fix the card")
    if model_bytes <= 0:
        raise ValueError(f"model_bytes must be positive, got {model_bytes} for {model.id}")


def _ranked(nodes: Sequence[NodeProfile]) -> list[NodeProfile]:
    return sorted(nodes, key=lambda node: (-node.memory_offered, node.node_id))


def _capacity(node: NodeProfile, n_layers: int, model_bytes: int) -> int:
    """Whole layers that fit in a node's usable memory, each layer model_bytes / n_layers."""
    return usable_bytes(node) * n_layers // model_bytes


def _place_on(
    chosen: Sequence[NodeProfile], n_layers: int, model_bytes: int
) -> tuple[ShardAssignment, ...] | None:
    """Layer ranges over exactly these nodes, in this rank order, or None if they cannot hold them."""
    caps = [_capacity(node, n_layers, model_bytes) for node in chosen]
    if min(caps) < 1 or sum(caps) < n_layers:
        return None
    counts = allocate_layers(n_layers, [usable_bytes(node) for node in chosen])
    spill = sum(max(0, c - cap) for c, cap in zip(counts, caps, strict=True))
    counts = [min(c, cap) for c, cap in zip(counts, caps, strict=True)]
    for _ in range(spill):  # rounding overfilled a node: move each extra layer to the roomiest
        i = max(range(len(counts)), key=lambda j: (caps[j] - counts[j], -j))
        counts[i] += 1
    starts = [sum(counts[:i]) for i in range(len(counts) + 1)]
    return tuple(
        ShardAssignment(node_id=node.node_id, rank=i, start=starts[i], end=starts[i + 1])
        for i, node in enumerate(chosen)
    )


def _shortfall(chosen: Sequence[NodeProfile], n_layers: int, model_bytes: int) -> int:
    """Least extra offered memory that lets these nodes hold the model, one layer each at least."""
    # In units of bytes * n_layers, so a layer is exactly model_bytes and every cost is an integer.
    scaled = [_headroom_left(node) * n_layers for node in chosen]
    caps = [max(0, s // model_bytes) for s in scaled]
    to_next = [(cap + 1) * model_bytes - s for cap, s in zip(caps, scaled, strict=True)]
    # Every node must reach one layer; the rest of the deficit goes to the cheapest next layers.
    must = sum(c for cap, c in zip(caps, to_next, strict=True) if cap == 0)
    deficit = max(0, n_layers - sum(max(cap, 1) for cap in caps))
    cheapest = sorted(c for cap, c in zip(caps, to_next, strict=True) if cap > 0)[:deficit]
    more = must + sum(cheapest) + (deficit - len(cheapest)) * model_bytes
    return math.ceil(more / n_layers / (1 - HEADROOM_FRACTION))


def _offered_for(usable: int) -> int:
    """Offered memory one node needs to keep `usable` bytes after its headroom."""
    return math.ceil((usable + RESERVE_BYTES) / (1 - HEADROOM_FRACTION))


def _human(n: int) -> str:
    """Decimal units, rounded up so a shortfall is never understated."""
    if n >= _GB:
        return f"{math.ceil(n / 100_000_000) / 10:.1f} GB"
    return f"{math.ceil(n / 1_000_000)} MB"
