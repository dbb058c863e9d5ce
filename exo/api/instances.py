"""Instances: where a model runs. Any node answers; commands are forwarded to the master."""

from __future__ import annotations

from typing import Any, Literal

import httpx
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from exo.master.planner import previews
from exo.master.service import ClusterService
from exo.models.cards import CARDS, ModelCard
from exo.shared.errors import InvalidRequest, ModelNotFound, PlacementRefused, ServiceUnavailable
from exo.shared.state import Instance, ShardAssignment
from exo.shared.types import InstanceId, new_instance_id

FORWARD_TIMEOUT = 10.0


class PlaceInstance(BaseModel):
    model_id: str
    min_nodes: int = Field(default=1, ge=1)
    sharding: Literal["pipeline"] = "pipeline"


class CreateInstance(BaseModel):
    model_id: str
    shards: list[ShardAssignment] = Field(min_length=1)


def _card(model_id: str) -> ModelCard:
    if (card := CARDS.get(model_id)) is None:
        raise ModelNotFound(f"The model {model_id!r} is not in the registry; GET /v1/models lists them.",
                            param="model_id")
    return card


async def _ask_master(cluster: ClusterService, method: str, path: str, body: bytes) -> httpx.Response:
    try:
        async with httpx.AsyncClient(timeout=FORWARD_TIMEOUT) as client:
            return await client.request(method, cluster.master_url() + path, content=body,
                                        headers={"Content-Type": "application/json"})
    except httpx.HTTPError as e:
        raise ServiceUnavailable(f"The master did not answer ({type(e).__name__}); retry shortly.") from e


async def ensure_instance(cluster: ClusterService, model_id: str) -> None:
    """Place `model_id` in the cluster unless an instance of it exists (registry models only)."""
    coordinator = cluster.coordinator
    if model_id not in CARDS or any(i.model_id == model_id for i in coordinator.state.instances.values()):
        return
    if coordinator.is_master:
        cluster.place_instance(CARDS[model_id])
        return
    answer = await _ask_master(cluster, "POST", "/place_instance", PlaceInstance(model_id=model_id)
                               .model_dump_json().encode())
    if answer.status_code != 200:
        error = answer.json().get("error", {})
        raise PlacementRefused(error.get("message", f"The master refused to place {model_id}."), param="model")


def instances_router(cluster: ClusterService) -> APIRouter:
    router = APIRouter()
    coordinator = cluster.coordinator

    async def forward(request: Request) -> Response:
        """Send this request to the master as it came, and answer with the master's response."""
        answer = await _ask_master(cluster, request.method, request.url.path, await request.body())
        return Response(answer.content, status_code=answer.status_code, media_type="application/json")

    @router.post("/place_instance", response_model=None)
    async def place_instance(body: PlaceInstance, request: Request) -> Instance | Response:
        if not coordinator.is_master:
            return await forward(request)
        return cluster.place_instance(_card(body.model_id), min_nodes=body.min_nodes)

    @router.post("/instance", response_model=None)
    async def create_instance(body: CreateInstance, request: Request) -> Instance | Response:
        if not coordinator.is_master:
            return await forward(request)
        card = _card(body.model_id)
        instance = Instance(instance_id=new_instance_id(), model_id=card.id, n_layers=card.n_layers,
                            shards=tuple(sorted(body.shards, key=lambda s: s.rank)))
        _check_explicit(instance, set(coordinator.state.nodes))
        return cluster.add_instance(instance)

    @router.get("/instance/previews")
    async def instance_previews(model_id: str) -> dict[str, Any]:
        card = _card(model_id)
        nodes = list(coordinator.state.nodes.values())
        options = previews(card, nodes, model_bytes=card.memory_bytes(cluster.dtype))
        return {"model_id": model_id, "previews": [{"shards": [s.model_dump() for s in p]} for p in options]}

    @router.get("/instance/{instance_id}")
    async def get_instance(instance_id: InstanceId) -> Instance:
        if (instance := coordinator.state.instances.get(instance_id)) is None:
            raise ModelNotFound(f"No instance {instance_id!r}; GET /state lists the instances.", param="instance_id")
        return instance

    @router.delete("/instance/{instance_id}", response_model=None)
    async def delete_instance(instance_id: InstanceId, request: Request) -> dict[str, str] | Response:
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
