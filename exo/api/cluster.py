"""Cluster endpoints: peers' messages in, and the cluster state out."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request, Response

from exo.api.auth import unauthorized
from exo.master.service import ClusterService
from exo.net.auth import HEADER, AuthError, Throttle
from exo.net.codec import WireError
from exo.net.transport import MESSAGE_PATH
from exo.shared.errors import InvalidRequest

log = logging.getLogger(__name__)


def cluster_router(cluster: ClusterService) -> APIRouter:
    router = APIRouter()
    coordinator, auth = cluster.coordinator, cluster.transport.auth
    refused = Throttle()

    @router.post(MESSAGE_PATH, include_in_schema=False)
    async def message(request: Request) -> Response:
        """A peer's frame. With a cluster secret, one without a valid proof of it never reaches the
        coordinator: the sender gets 401, and the log a warning (at most one per sender per 30 s)."""
        host = request.client.host if request.client else "127.0.0.1"
        frame = await request.body()
        if auth is not None:
            try:
                auth.verify(request.headers.get(HEADER), frame)
            except AuthError as e:
                if refused(host):
                    log.warning("cluster: refused messages from host=%s: %s", host, e)
                return unauthorized(f"Refused: {e}. Every node of a cluster needs the same --cluster-secret.",
                                    "invalid_cluster_proof", scheme=HEADER)
        try:
            cluster.receive(frame, host)
        except WireError as e:
            log.warning("dropped a malformed message from %s: %s", request.client, e)
            raise InvalidRequest(f"Malformed cluster message: {e}") from e
        return Response(status_code=204)

    @router.get("/node_id")
    async def node_id() -> str:
        return coordinator.node_id

    @router.get("/state")
    async def state() -> dict[str, Any]:
        """The replicated cluster state, plus what this node sees right now, in camelCase with each
        instance tagged by its kind, as exo's upstream shows it."""
        now = cluster.clock()
        return {
            **coordinator.state.model_dump(mode="json"),
            "nodeId": coordinator.node_id,
            "masterId": coordinator.master_id,
            "term": coordinator.term,
            "isMaster": coordinator.is_master,
            "mode": cluster.mode,
            "queues": cluster.all_queues(),
            "peers": {n: {"secondsSinceHeartbeat": round(now - seen, 3), "term": hb.term, "masterId": hb.master_id}
                      for n, (seen, hb) in coordinator.peers.items()},
        }

    return router
