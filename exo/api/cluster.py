"""Cluster endpoints: peers' messages in, and the cluster state out."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request, Response

from exo.master.service import ClusterService
from exo.net.codec import WireError
from exo.net.transport import MESSAGE_PATH
from exo.shared.errors import InvalidRequest

log = logging.getLogger(__name__)


def cluster_router(cluster: ClusterService) -> APIRouter:
    router = APIRouter()
    coordinator = cluster.coordinator

    @router.post(MESSAGE_PATH, include_in_schema=False)
    async def message(request: Request) -> Response:
        try:
            cluster.receive(await request.body(), request.client.host if request.client else "127.0.0.1")
        except WireError as e:
            log.warning("dropped a malformed message from %s: %s", request.client, e)
            raise InvalidRequest(f"Malformed cluster message: {e}") from e
        return Response(status_code=204)

    @router.get("/node_id")
    async def node_id() -> str:
        return coordinator.node_id

    @router.get("/state")
    async def state() -> dict[str, Any]:
        """The replicated cluster state, plus what this node sees right now."""
        now = cluster.clock()
        return {
            **coordinator.state.model_dump(mode="json"),
            "node_id": coordinator.node_id,
            "master_id": coordinator.master_id,
            "term": coordinator.term,
            "is_master": coordinator.is_master,
            "peers": {n: {"seconds_since_heartbeat": round(now - seen, 3), "term": hb.term, "master_id": hb.master_id}
                      for n, (seen, hb) in coordinator.peers.items()},
        }

    return router
