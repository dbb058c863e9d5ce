"""Instances: where a model runs. Any node answers; commands are forwarded to the master."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

import anyio
import httpx
from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from exo.api.forward import ask_node
from exo.api.limits import MAX_ID_CHARS, MAX_SHARDS, ModelIdStr
from exo.master.planner import committed_bytes, previews
from exo.master.replan import draining_nodes, eligible_nodes
from exo.master.service import ClusterService
from exo.models.cards import ModelCard
from exo.shared.errors import InvalidRequest, ModelNotFound, PlacementRefused, ServiceUnavailable
from exo.shared.runners import SERVING, RunnerStatus, runner_id
from exo.shared.state import Instance, ShardAssignment, SharedModel, State
from exo.shared.types import Context, InstanceId, new_instance_id
from exo.worker.tokenizers import Tokenizers

READY_TIMEOUT = 120.0  # how long a chat waits for its instance's runners to load
InstanceIdPath = Annotated[InstanceId, Path(max_length=MAX_ID_CHARS)]
MAX_LAYERS = 10_000  # far more than any model has; keeps an explicit placement's ints small enough for the wire


class _Body(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)  # either spelling, as /state's


class PlaceInstance(_Body):
    model_id: ModelIdStr
    min_nodes: int = Field(default=1, ge=1, le=MAX_SHARDS)
    sharding: Literal["pipeline"] = "pipeline"
    if_absent: bool = False  # answer with an existing instance of the model instead of placing another
    context: Context | None = None  # the positions it serves, within the model's own; None: --context's


class CreateInstance(_Body):
    model_id: ModelIdStr
    shards: list[ShardAssignment] = Field(min_length=1, max_length=MAX_SHARDS)
    n_layers: int | None = Field(default=None, ge=1, le=MAX_LAYERS)  # for a model outside the registry
    context: Context | None = None  # as PlaceInstance's; None: --context's for a model the master knows


def _card(cluster: ClusterService, model_id: str) -> ModelCard | SharedModel:
    if (card := cluster.placeable(model_id)) is None:
        raise ModelNotFound(f"The model {model_id!r} is neither in the registry nor served by a node from its own "
                            "files; GET /v1/models lists them.", param="model_id")
    return card


async def _ask_master(cluster: ClusterService, method: str, path: str, body: bytes) -> httpx.Response:
    return await ask_node(cluster.master_url(), method, path, body, who="The master")


async def ensure_instance(cluster: ClusterService, tokenizers: Tokenizers, model_id: str) -> None:
    """Place `model_id` unless an instance of it exists: a model from this node's own files on this node
    alone, a registry model or another node's own where the planner says."""
    coordinator = cluster.coordinator
    if any(i.model_id == model_id for i in coordinator.state.instances.values()):
        return
    if model_id not in tokenizers.catalog.local:  # a registry model, or another node's own
        if coordinator.is_master:
            cluster.place_instance(_card(cluster, model_id))
            return
        path, body = "/place_instance", PlaceInstance(model_id=model_id, if_absent=True).model_dump_json()
    else:
        _, args = await tokenizers.get(model_id)
        shard = ShardAssignment(node_id=coordinator.node_id, rank=0, start=0, end=args.num_hidden_layers)
        context = min(cluster.context, args.max_position_embeddings)  # its node's --context
        body = CreateInstance(model_id=model_id, shards=[shard], n_layers=args.num_hidden_layers,
                              context=context).model_dump_json()
        if coordinator.is_master:
            cluster.add_instance(Instance(instance_id=new_instance_id(), model_id=model_id,
                                          n_layers=args.num_hidden_layers, shards=(shard,), context=context))
            return
        path = "/instance"
    answer = await _ask_master(cluster, "POST", path, body.encode())
    if answer.status_code != 200:
        error = answer.json().get("error", {})
        raise PlacementRefused(error.get("message", f"The master refused to place {model_id}."), param="model")


async def route(cluster: ClusterService, tokenizers: Tokenizers, model_id: str, forwarded: bool, *,
                local: Callable[[], Mapping[str, RunnerStatus]]) -> tuple[Instance, str | None]:
    """A ready instance of `model_id` and, unless its rank 0 is on this node, the API of the node
    where it is. Places an instance if there is none and waits for its runners to load. The runners
    on this node are as `local` says now, not as the cluster state will hear of them later."""
    coordinator = cluster.coordinator
    if not forwarded:
        await ensure_instance(cluster, tokenizers, model_id)
    with anyio.move_on_after(READY_TIMEOUT):
        while True:
            state = coordinator.state
            instances = [i for i in state.instances.values() if i.model_id == model_id]
            here_now = local()
            ready = [i for i in instances if _all_runners(state, i, SERVING, here_now, coordinator.node_id)
                     and not draining_nodes(state, i)]
            here = [i for i in ready if i.shards[0].node_id == coordinator.node_id]
            if here:
                return here[0], None
            if ready and not forwarded:
                head = ready[0].shards[0].node_id
                if (url := cluster.transport.url(head)) is not None:
                    return ready[0], url
            if instances and all(problems := [_broken(state, i) for i in instances]):
                raise ServiceUnavailable(f"The {model_id} instance cannot serve: {problems[0]}. The master places "
                                         "it again on the nodes there are; retry shortly.")
            if forwarded and not instances:
                raise ServiceUnavailable(f"This node no longer serves {model_id}; retry the request.")
            await anyio.sleep(0.05)
    raise ServiceUnavailable(f"No instance of {model_id} became ready within {READY_TIMEOUT:.0f}s; GET /state shows "
                             "its runners.")


def _broken(state: State, instance: Instance) -> str | None:
    """Why `instance` will not become ready by waiting, if it will not: first a node that left (the
    cause), then a runner that failed (often the effect)."""
    if gone := [s.node_id for s in instance.shards if s.node_id not in state.nodes]:
        return f"its node {gone[0]} has left the cluster"
    if draining := draining_nodes(state, instance):
        return f"its node {draining[0]} is draining (maintenance, or stopping) and it is moving elsewhere"
    for shard in instance.shards:
        runner = state.runners.get(runner_id(instance.instance_id, shard.rank))
        if runner is not None and runner.status in (RunnerStatus.FAILED, RunnerStatus.SHUTDOWN):
            return f"runner {runner.runner_id} is {runner.status}" + (f" ({runner.error})" if runner.error else "")
    return None


def _all_runners(state: State, instance: Instance, statuses: tuple[RunnerStatus, ...],
                 local: Mapping[str, RunnerStatus], node_id: str) -> bool:
    def status(shard: ShardAssignment) -> RunnerStatus | None:
        rid = runner_id(instance.instance_id, shard.rank)
        if shard.node_id == node_id:
            return local.get(rid)
        return runner.status if (runner := state.runners.get(rid)) is not None else None
    return all(status(s) in statuses for s in instance.shards)


def instances_router(cluster: ClusterService) -> APIRouter:
    router = APIRouter()
    coordinator = cluster.coordinator

    async def forward(request: Request) -> Response:
        """Send this request to the master as it came, and answer with the master's response."""
        answer = await _ask_master(cluster, request.method, request.url.path, await request.body())
        retry = {"Retry-After": answer.headers["retry-after"]} if "retry-after" in answer.headers else None
        return Response(answer.content, status_code=answer.status_code, media_type="application/json", headers=retry)

    @router.post("/place_instance", response_model=None)
    async def place_instance(body: PlaceInstance, request: Request) -> Instance | Response:
        if not coordinator.is_master:
            return await forward(request)
        existing = [i for i in coordinator.state.instances.values() if i.model_id == body.model_id]
        if body.if_absent and existing:
            return existing[0]
        return cluster.place_instance(_card(cluster, body.model_id), min_nodes=body.min_nodes, context=body.context)

    @router.post("/instance", response_model=None)
    async def create_instance(body: CreateInstance, request: Request) -> Instance | Response:
        if not coordinator.is_master:
            return await forward(request)
        card = cluster.placeable(body.model_id)
        n_layers = body.n_layers or _card(cluster, body.model_id).n_layers
        context = cluster.served_context(card, body.context) if card is not None else body.context
        instance = Instance(instance_id=new_instance_id(), model_id=body.model_id, n_layers=n_layers,
                            shards=tuple(sorted(body.shards, key=lambda s: s.rank)), context=context)
        _check_explicit(instance, set(coordinator.state.nodes))
        return cluster.add_instance(instance)

    @router.get("/instance/previews")
    async def instance_previews(model_id: Annotated[ModelIdStr, Query()],
                                context: Annotated[Context | None, Query()] = None) -> dict[str, Any]:
        card = _card(cluster, model_id)
        nodes = eligible_nodes(coordinator.state)
        context = cluster.served_context(card, context)
        model_bytes = cluster.instance_bytes(card, context)
        committed, loading = committed_bytes(coordinator.state, cluster.placed_bytes)  # as place_instance counts
        options = previews(card, nodes, model_bytes=model_bytes, committed=committed, loading=loading)

        def shard(s: ShardAssignment) -> dict[str, Any]:  # with the memory its layers take on its node
            return {**s.model_dump(mode="json"), "memoryBytes": model_bytes * (s.end - s.start) // card.n_layers}

        return {"modelId": model_id, "nLayers": card.n_layers, "context": context, "memoryBytes": model_bytes,
                "previews": [{"shards": [shard(s) for s in p]} for p in options]}

    @router.get("/instance/{instance_id}")
    async def get_instance(instance_id: InstanceIdPath) -> Instance:
        if (instance := coordinator.state.instances.get(instance_id)) is None:
            raise ModelNotFound(f"No instance {instance_id!r}; GET /state lists the instances.", param="instance_id")
        return instance

    @router.delete("/instance/{instance_id}", response_model=None)
    async def delete_instance(instance_id: InstanceIdPath, request: Request) -> dict[str, str] | Response:
        if not coordinator.is_master:
            return await forward(request)
        await get_instance(instance_id)
        cluster.delete_instance(instance_id)
        return {"deleted": instance_id}

    return router


def _check_explicit(instance: Instance, nodes: set[str]) -> None:
    """An explicit placement must name known nodes, ranks 0..n-1, and cover the layers contiguously."""
    shards = instance.shards
    if unknown := [s.node_id for s in shards if s.node_id not in nodes]:
        raise InvalidRequest(f"Unknown node(s) {unknown}; GET /state lists the nodes.", param="shards")
    if [s.rank for s in shards] != list(range(len(shards))):
        raise InvalidRequest("Ranks must be 0, 1, ... n-1, one shard each.", param="shards")
    bounds = [(s.start, s.end) for s in shards]
    if bounds[0][0] != 0 or bounds[-1][1] != instance.n_layers or any(
            a_end != b_start for (_, a_end), (b_start, _) in zip(bounds, bounds[1:], strict=False)) or any(
            start >= end for start, end in bounds):
        raise InvalidRequest(f"Layer ranges must be non-empty and cover [0, {instance.n_layers}) in rank order.",
                             param="shards")
