"""The planner puts a model on the fewest nodes that hold it, in layer ranges sized by memory."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest

from exo.master.planner import (
    HEADROOM_FRACTION,
    RESERVE_BYTES,
    allocate_layers,
    committed_bytes,
    instance_bytes,
    max_nodes_for,
    place,
    previews,
    usable_bytes,
)
from exo.models.cards import ModelCard, PypiWheelSource, WheelMember
from exo.shared.errors import PlacementRefused
from exo.shared.runners import RunnerInfo, RunnerStatus, runner_id
from exo.shared.state import Instance, NodeProfile, ShardAssignment, State
from exo.shared.types import CacheDtype, Dtype, InstanceId, NodeId

GB = 1_000_000_000


def node(name: str, gb: float, *, cap_gb: float | None = None) -> NodeProfile:
    """A node with `gb` of available memory, capped at `cap_gb` by --max-memory if given."""
    return NodeProfile(
        node_id=NodeId(name),
        hostname=name,
        version="0.1.0",
        address="127.0.0.1",
        api_port=52415,
        memory_total=int(max(gb, cap_gb or 0) * GB),
        memory_available=int(gb * GB),
        memory_cap=int(cap_gb * GB) if cap_gb is not None else None,
        cpu_count=8,
        accelerator="cpu",
        mlx_device="cpu",
    )


def card(n_layers: int) -> ModelCard:
    return ModelCard(
        id="test-model",
        name="Test Model",
        license="test",
        bytes=1,
        n_params=1,
        n_layers=n_layers,
        hidden_size=64,
        kv_width=128,
        context_length=2048,
        source=PypiWheelSource(parts=(WheelMember(package="p", version="1", member="p/m.gguf"),), sha256="0" * 64),
    )


def nodes(*gbs: float) -> list[NodeProfile]:
    """Nodes named a, b, c, ... with these amounts of available memory."""
    return [node(chr(ord("a") + i), gb) for i, gb in enumerate(gbs)]


def ranges(shards: tuple[ShardAssignment, ...]) -> list[tuple[str, int, int]]:
    assert [s.rank for s in shards] == list(range(len(shards)))
    return [(s.node_id, s.start, s.end) for s in shards]


# --- the size rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_bytes", "expected"),
    [
        (1, 1),
        (2 * GB - 1, 1),
        (2 * GB, 2),
        (10 * GB, 2),
        (10 * GB + 1, 4),
        (70 * GB, 4),
    ],
)
def test_size_rule_spreads_bigger_models_over_more_nodes(model_bytes: int, expected: int) -> None:
    assert max_nodes_for(model_bytes) == expected


def test_headroom_keeps_a_fraction_and_a_reserve_free() -> None:
    assert usable_bytes(node("a", 10)) == int(10 * GB * (1 - HEADROOM_FRACTION)) - RESERVE_BYTES
    assert usable_bytes(node("a", 0.1)) == 0


# --- allocate_layers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_layers", "weights", "expected"),
    [
        (30, [2, 1], [20, 10]),
        (30, [1, 2], [10, 20]),
        (10, [1, 1, 1], [4, 3, 3]),
        (7, [1], [7]),
        (1, [5.0], [1]),
        (4, [1, 1, 1, 1], [1, 1, 1, 1]),
        (3, [100, 1, 1], [1, 1, 1]),
        (5, [1000, 1], [4, 1]),
        (32, [0.5, 0.25, 0.25], [16, 8, 8]),
    ],
)
def test_layers_are_allocated_in_proportion_with_at_least_one_each(
    n_layers: int, weights: list[float], expected: list[int]
) -> None:
    assert allocate_layers(n_layers, weights) == expected


@pytest.mark.parametrize(
    ("n_layers", "weights"),
    [(2, [1, 1, 1]), (3, []), (3, [1, 0]), (3, [1, -1]), (3, [1, float("inf")])],
)
def test_allocate_layers_rejects_impossible_or_meaningless_weights(
    n_layers: int, weights: list[float]
) -> None:
    with pytest.raises(ValueError):
        allocate_layers(n_layers, weights)


# --- place: which nodes and which layers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("cluster", "model_gb", "n_layers", "min_nodes", "expected"),
    [
        pytest.param(nodes(16), 1, 30, 1, [("a", 0, 30)], id="one_node_takes_every_layer"),
        pytest.param(nodes(4, 16, 8), 1, 30, 1, [("b", 0, 30)], id="small_model_on_largest_node"),
        pytest.param(nodes(16, 16), 3, 30, 1, [("a", 0, 30)], id="3gb_model_not_spread_when_one_fits"),
        pytest.param(
            nodes(2, 2, 2), 3, 30, 1, [("a", 0, 15), ("b", 15, 30)], id="3gb_model_on_two_2gb_nodes"
        ),
        pytest.param(nodes(4, 8), 9, 30, 1, [("b", 0, 20), ("a", 20, 30)], id="8gb_and_4gb_split_20_10"),
        pytest.param(
            nodes(8, 4), 1, 30, 2, [("a", 0, 20), ("b", 20, 30)], id="asked_two_nodes_split_20_10"
        ),
        pytest.param(
            nodes(8, 8, 8, 8),
            1,
            30,
            3,
            [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)],
            id="asked_three_nodes_of_four",
        ),
        pytest.param(
            nodes(9.25, 2.25),
            9,
            8,
            1,
            [("a", 0, 7), ("b", 7, 8)],
            id="rounding_never_overfills_a_node",
        ),
        pytest.param(
            nodes(24, 24), 40, 80, 1, [("a", 0, 40), ("b", 40, 80)], id="many_more_layers_than_nodes"
        ),
        pytest.param(nodes(16, 16), 0.1, 2, 2, [("a", 0, 1), ("b", 1, 2)], id="two_layers_two_nodes"),
        pytest.param(nodes(16), 0.1, 1, 1, [("a", 0, 1)], id="one_layer_one_node"),
    ],
)
def test_model_uses_the_fewest_nodes_that_hold_it_split_by_memory(
    cluster: list[NodeProfile],
    model_gb: float,
    n_layers: int,
    min_nodes: int,
    expected: list[tuple[str, int, int]],
) -> None:
    shards = place(card(n_layers), cluster, model_bytes=int(model_gb * GB), min_nodes=min_nodes)
    assert ranges(shards) == expected


def test_model_over_2gb_uses_two_nodes_when_one_is_too_small() -> None:
    shards = place(card(30), nodes(2, 2), model_bytes=3 * GB)
    assert [s.node_id for s in shards] == ["a", "b"]


def test_small_model_on_capped_nodes_grows_past_the_size_rule() -> None:
    # 1.5 GB would use one node by size, but --max-memory leaves each node room for 5 of 24 layers.
    cluster = [node(name, 64, cap_gb=0.5) for name in "abcdef"]
    shards = place(card(24), cluster, model_bytes=int(1.5 * GB))
    assert len(shards) > max_nodes_for(int(1.5 * GB))
    assert ranges(shards) == [("a", 0, 5), ("b", 5, 10), ("c", 10, 15), ("d", 15, 20), ("e", 20, 24)]


@pytest.mark.parametrize(
    ("cluster", "model_gb", "n_layers", "min_nodes"),
    [
        (nodes(16), 1, 30, 1),
        (nodes(2, 2, 2), 3, 30, 1),
        (nodes(8, 4), 9, 30, 1),
        (nodes(9.25, 2.25), 9, 8, 1),
        (nodes(5.75, 1.75, 4.5), 8, 11, 1),
        (nodes(2, 7, 3, 8.25), 16, 11, 1),
        (nodes(32, 1, 1, 1), 0.5, 4, 4),
        (nodes(24, 24, 24, 24), 70, 80, 1),
    ],
)
def test_ranges_are_contiguous_cover_every_layer_and_fit_each_node(
    cluster: list[NodeProfile], model_gb: float, n_layers: int, min_nodes: int
) -> None:
    model_bytes = int(model_gb * GB)
    shards = place(card(n_layers), cluster, model_bytes=model_bytes, min_nodes=min_nodes)
    assert [s.rank for s in shards] == list(range(len(shards)))
    assert [s.start for s in shards] == [0, *(s.end for s in shards[:-1])]
    assert shards[-1].end == n_layers
    assert all(s.start < s.end for s in shards)
    assert len({s.node_id for s in shards}) == len(shards)
    by_id = {n.node_id: n for n in cluster}
    for s in shards:
        assert (s.end - s.start) * model_bytes <= usable_bytes(by_id[s.node_id]) * n_layers


# --- the operator's memory cap ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cluster", "expected"),
    [
        pytest.param(
            [node("a", 64, cap_gb=2), node("b", 2)], [("a", 0, 15), ("b", 15, 30)], id="capped"
        ),
        pytest.param([node("a", 64), node("b", 2)], [("a", 0, 30)], id="uncapped"),
        pytest.param(
            [node("a", 2, cap_gb=64), node("b", 2)],
            [("a", 0, 15), ("b", 15, 30)],
            id="cap_above_available",
        ),
    ],
)
def test_memory_cap_limits_what_a_node_takes(
    cluster: list[NodeProfile], expected: list[tuple[str, int, int]]
) -> None:
    assert ranges(place(card(30), cluster, model_bytes=3 * GB)) == expected


def test_capped_node_gets_no_more_layers_than_its_cap_allows() -> None:
    cluster = [node("a", 64, cap_gb=1), node("b", 64, cap_gb=8)]
    shards = place(card(30), cluster, model_bytes=int(7.5 * GB))  # 0.25 GB a layer
    assert ranges(shards) == [("b", 0, 27), ("a", 27, 30)]
    assert usable_bytes(cluster[0]) // int(0.25 * GB) == 3


# --- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cluster", "model_gb", "n_layers", "min_nodes", "says"),
    [
        pytest.param([], 1, 30, 1, ["no nodes", "1.3 GB"], id="no_nodes"),
        pytest.param(nodes(16, 16), 1, 30, 3, ["cluster has 2", "1 more machine"], id="too_few_nodes"),
        pytest.param(nodes(16, 16, 16), 0.1, 2, 3, ["has 2 layer(s)", "at most 2"], id="fewer_layers"),
        pytest.param(
            nodes(16, 16), 0.1, 1, 2, ["has 1 layer(s)", "at most 1"], id="one_layer_two_nodes"
        ),
        pytest.param(nodes(1), 1, 10, 1, ["needs 261 MB more"], id="one_node_short"),
        pytest.param(nodes(1, 1), 2, 10, 1, ["2 node(s)", "needs 521 MB more"], id="two_nodes_short"),
        pytest.param(
            nodes(1, 1, 1),
            1,
            1,
            1,
            ["1 node(s)", "at most 1 node(s)", "needs 261 MB more"],
            id="one_layer_model_fits_no_single_node",
        ),
        pytest.param(nodes(64, 0.1), 1, 30, 2, ["needs 87 MB more"], id="second_node_has_no_room"),
        pytest.param(nodes(64, 64), 200, 30, 1, ["200.0 GB", "needs 94.6 GB more"], id="far_too_big"),
    ],
)
def test_refusal_says_what_is_missing(
    cluster: list[NodeProfile], model_gb: float, n_layers: int, min_nodes: int, says: list[str]
) -> None:
    with pytest.raises(PlacementRefused) as refused:
        place(card(n_layers), cluster, model_bytes=int(model_gb * GB), min_nodes=min_nodes)
    for text in says:
        assert text in refused.value.message


@pytest.mark.parametrize(
    ("dtype", "kv_cache", "value_bytes", "weights"),
    [
        pytest.param("quantized", None, 4, 1, id="quantized_weights_float32_cache"),
        pytest.param("quantized", "float16", 2, 1, id="quantized_weights_float16_cache"),
        pytest.param("bfloat16", None, 2, 2 * 1000, id="half_weights_cache_of_the_same_width"),
        pytest.param("float32", "float16", 2, 4 * 1000, id="float_weights_float16_cache"),
    ],
)
def test_an_instance_takes_its_weights_and_a_cache_of_its_context_in_every_layer(
    dtype: Dtype, kv_cache: CacheDtype | None, value_bytes: int, weights: int
) -> None:
    model = card(30).model_copy(update={"n_params": 1000})  # bytes as stored: 1
    # the running request's cache, and as much for the prefix cache
    assert instance_bytes(model, 4096, dtype, kv_cache) == weights + 2 * 30 * 128 * 4096 * value_bytes
    assert instance_bytes(model, 0, dtype, kv_cache) == model.memory_bytes(dtype) == weights


def test_a_context_too_long_for_the_cluster_is_refused_naming_it() -> None:
    model = card(30)
    cache = instance_bytes(model, 2048, "quantized", None) - 1  # 63 MB: twice 30 layers of 2048 positions
    fits = node("a", (offered_for(cache) + 10_000_000) / GB)
    assert place(model, [fits], model_bytes=instance_bytes(model, 2048, "quantized", None), context=2048)
    with pytest.raises(PlacementRefused) as refused:
        place(model, [node("a", offered_for(cache // 2) / GB)], model_bytes=cache + 1, context=2048)
    assert "key/value caches for 2048 tokens" in refused.value.message
    assert "lower --context" in refused.value.message


def test_the_missing_amount_is_enough_and_barely() -> None:
    model, model_bytes = card(10), 1 * GB
    short = node("a", 1)
    missing = 260_241_920  # what the refusal reports as "261 MB", unrounded
    with pytest.raises(PlacementRefused):
        place(model, [short], model_bytes=model_bytes)
    assert place(model, [node("a", (short.memory_offered + missing) / GB)], model_bytes=model_bytes)
    with pytest.raises(PlacementRefused):
        place(model, [node("a", (short.memory_offered + missing - 2) / GB)], model_bytes=model_bytes)


@pytest.mark.parametrize(
    ("n_layers", "model_bytes", "min_nodes"),
    [(0, GB, 1), (30, 0, 1), (30, -1, 1), (30, GB, 0), (30, GB, -1)],
)
def test_caller_bugs_are_value_errors_not_refusals(
    n_layers: int, model_bytes: int, min_nodes: int
) -> None:
    with pytest.raises(ValueError):
        place(card(n_layers), nodes(16), model_bytes=model_bytes, min_nodes=min_nodes)


# --- determinism -----------------------------------------------------------------------------------


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_input_order_does_not_change_the_placement(order: tuple[int, ...]) -> None:
    cluster = nodes(4, 8, 8, 2)  # b and c tie on memory: node_id decides
    expected = [("b", 0, 11), ("c", 11, 22), ("a", 22, 27), ("d", 27, 30)]
    shuffled = [cluster[i] for i in order]
    assert ranges(place(card(30), shuffled, model_bytes=GB, min_nodes=4)) == expected
    assert previews(card(30), shuffled, model_bytes=GB) == previews(card(30), cluster, model_bytes=GB)


# --- previews --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cluster", "model_gb", "n_layers", "node_counts"),
    [
        pytest.param(nodes(16, 16, 16, 16), 1, 30, [1], id="small_model_stays_on_one"),
        pytest.param(nodes(16, 16, 16, 16), 5, 30, [1, 2], id="mid_model_up_to_two"),
        pytest.param(nodes(16, 16, 16, 16), 20, 30, [2, 3, 4], id="big_model_from_fewest_to_four"),
        pytest.param(nodes(16, 16, 16), 20, 30, [2, 3], id="bounded_by_nodes"),
        pytest.param(nodes(16, 16, 16, 16), 20, 3, [2, 3], id="bounded_by_layers"),
        pytest.param(nodes(16, 16, 0.1, 16), 20, 30, [2, 3], id="skips_counts_that_cannot_fit"),
        pytest.param([node(n, 64, cap_gb=0.5) for n in "abcdef"], 1.5, 24, [5], id="memory_beyond_rule"),
        pytest.param(nodes(1, 1), 20, 30, [], id="nothing_fits"),
        pytest.param([], 1, 30, [], id="no_nodes"),
    ],
)
def test_previews_offer_each_node_count_from_the_fewest_that_fit(
    cluster: list[NodeProfile], model_gb: float, n_layers: int, node_counts: list[int]
) -> None:
    model_bytes = int(model_gb * GB)
    options = previews(card(n_layers), cluster, model_bytes=model_bytes)
    assert [len(p) for p in options] == node_counts
    if options:
        assert options[0] == place(card(n_layers), cluster, model_bytes=model_bytes)
    for p in options:
        assert p == place(card(n_layers), cluster, model_bytes=model_bytes, min_nodes=len(p))


# --- instances already placed ---------------------------------------------------------------------


def offered_for(weights: int) -> int:
    """Offered memory that holds `weights` with their headroom and a runner's reserve."""
    return math.ceil((weights + RESERVE_BYTES) / (1 - HEADROOM_FRACTION))


def sized(sizes: dict[str, int]) -> Callable[[Instance], int | None]:
    """What each instance placed takes, by its model."""
    return lambda instance: sizes.get(instance.model_id)


def placed(*instances: tuple[str, list[tuple[str, int, int]], RunnerStatus | None]) -> State:
    """A state holding these instances (model, shards as (node, start, end), status of every runner)."""
    made = [Instance(instance_id=InstanceId(f"i{i}"), model_id=model, n_layers=30,
                     shards=tuple(ShardAssignment(node_id=NodeId(n), rank=r, start=s, end=e)
                                  for r, (n, s, e) in enumerate(shards)))
            for i, (model, shards, _) in enumerate(instances)]
    runners = {runner_id(inst.instance_id, s.rank): RunnerInfo(
        instance_id=inst.instance_id, rank=s.rank, node_id=s.node_id, start=s.start, end=s.end, status=status,
        host="127.0.0.1", port=1) for inst, (_, _, status) in zip(made, instances, strict=True) if status
        for s in inst.shards}
    return State(instances={i.instance_id: i for i in made}, runners=runners)


@pytest.mark.parametrize(
    ("state", "committed", "loading"),
    [
        pytest.param(placed(), {}, {}, id="nothing_placed"),
        pytest.param(placed(("m", [("a", 0, 30)], None)), {"a": offered_for(GB)}, {"a": offered_for(GB)},
                     id="whole_model_not_started"),
        pytest.param(placed(("m", [("a", 0, 30)], RunnerStatus.LOADING)), {"a": offered_for(GB)},
                     {"a": offered_for(GB)}, id="whole_model_loading"),
        pytest.param(placed(("m", [("a", 0, 30)], RunnerStatus.READY)), {"a": offered_for(GB)}, {},
                     id="whole_model_loaded"),
        pytest.param(placed(("m", [("a", 0, 15), ("b", 15, 30)], RunnerStatus.RUNNING)),
                     {"a": offered_for(GB // 2), "b": offered_for(GB // 2)}, {}, id="half_on_each"),
        pytest.param(placed(("m", [("a", 0, 30)], RunnerStatus.READY), ("m", [("a", 0, 30)], None)),
                     {"a": 2 * offered_for(GB)}, {"a": offered_for(GB)}, id="two_copies_one_loaded"),
        pytest.param(placed(("local", [("a", 0, 30)], None)), {"a": offered_for(0)}, {"a": offered_for(0)},
                     id="unknown_size_only_a_reserve"),
    ],
)
def test_committed_memory_is_each_shards_share_and_loading_what_runners_have_not_loaded(
    state: State, committed: dict[str, int], loading: dict[str, int]
) -> None:
    assert committed_bytes(state, sized({"m": GB})) == (committed, loading)


@pytest.mark.parametrize(
    ("cluster", "copies"),
    [
        pytest.param([node("a", 8)], 6, id="available_memory_when_uncapped"),
        pytest.param([node("a", 64, cap_gb=4)], 3, id="the_cap_bounds_all_copies"),
        pytest.param([node("a", 2.6, cap_gb=64)], 2, id="available_now_bounds_runners_not_loaded"),
        pytest.param(nodes(4, 4), 6, id="copies_fill_every_node"),
    ],
)
def test_copies_placed_before_their_runners_load_fill_memory_then_are_refused(
    cluster: list[NodeProfile], copies: int
) -> None:
    """Memory available now does not shrink until a runner loads: the instances placed count instead."""
    model, state = card(30), State()
    for i in range(copies):
        committed, loading = committed_bytes(state, sized({model.id: GB}))
        shards = place(model, cluster, model_bytes=GB, committed=committed, loading=loading)
        instance = Instance(instance_id=InstanceId(f"copy{i}"), model_id=model.id, n_layers=30, shards=shards)
        state = state.model_copy(update={"instances": {**state.instances, instance.instance_id: instance}})
    committed, loading = committed_bytes(state, sized({model.id: GB}))
    with pytest.raises(PlacementRefused) as refused:
        place(model, cluster, model_bytes=GB, committed=committed, loading=loading)
    assert "that instances already placed take" in refused.value.message
    assert "DELETE /instance/ID" in refused.value.message
    assert not previews(model, cluster, model_bytes=GB, committed=committed, loading=loading)


def test_a_loaded_copy_is_not_counted_twice_against_the_memory_it_already_took() -> None:
    """Once its runner holds its weights, memory available now shows a copy: only the total counts it."""
    model = card(30)
    state = placed(("test-model", [("a", 0, 30)], RunnerStatus.READY))
    after_load = node("a", 8 - offered_for(GB) / GB)
    committed, loading = committed_bytes(state, sized({model.id: GB}))
    assert place(model, [after_load], model_bytes=GB, committed=committed, loading=loading)
