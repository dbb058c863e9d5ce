"""Admission and maintenance: whether this node takes new requests, and how many it is serving.

A node that drains (maintenance, or the first phase of a stop) answers new chat requests with 503
and `Retry-After`, lets the ones in flight finish, and tells the cluster, whose master then moves
its instances elsewhere once they are idle.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from exo.api.errors import RETRY_AFTER_SECONDS, error_response
from exo.api.metrics import Metrics
from exo.api.openai.router import FORWARDED
from exo.master.service import ClusterService
from exo.shared.errors import InvalidRequest, ServiceUnavailable
from exo.shared.state import NodeMode

WORK_PATHS = ("/v1/chat/completions", "/v1/completions")  # what a draining node refuses, and counts while it runs


class Admission:
    """This node's door: open or draining, and the requests that came through it still running."""

    def __init__(self, cluster: ClusterService) -> None:
        self.cluster = cluster
        self.stopping = False  # draining for good: the node is shutting down
        self.in_flight = 0

    @property
    def draining(self) -> bool:
        return self.cluster.mode == NodeMode.DRAIN

    def refusal(self) -> ServiceUnavailable:
        why = "is shutting down" if self.stopping else "is in maintenance (draining)"
        return ServiceUnavailable(f"This node {why} and takes no new requests; send them to another node, "
                                  f"or retry in {RETRY_AFTER_SECONDS}s.")


class AdmissionMiddleware:
    """Counts requests for work while they run, streams included, and refuses them while draining."""

    def __init__(self, app: ASGIApp, admission: Admission, metrics: Metrics | None = None) -> None:
        self.app, self.admission, self.metrics = app, admission, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in WORK_PATHS:
            await self.app(scope, receive, send)
            return
        if self.admission.draining:
            refusal = self.admission.refusal()
            if self.metrics is not None:  # counted like any refused chat, for no model yet
                record = self.metrics.chat(forwarded=any(k.decode() == FORWARDED for k, _ in scope["headers"]))
                record.fail(refusal)
                record.end()
            await error_response(refusal)(scope, receive, send)
            return
        self.admission.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.in_flight -= 1


class MaintenanceRequest(BaseModel):
    mode: NodeMode


def control_router(cluster: ClusterService, admission: Admission) -> APIRouter:
    router = APIRouter(prefix="/control")

    @router.post("/maintenance")
    async def maintenance(body: MaintenanceRequest) -> dict[str, Any]:
        """Drain this node (no new requests; those in flight finish; its instances move elsewhere once
        idle), or bring it back to normal."""
        if admission.stopping and body.mode == NodeMode.NORMAL:
            raise InvalidRequest("This node is shutting down; it cannot return to normal.", param="mode")
        cluster.set_mode(body.mode)  # logs the change
        return {"node_id": cluster.coordinator.node_id, "mode": body.mode, "in_flight": admission.in_flight}

    return router
