"""Cluster endpoints: peers' messages in, and the cluster state out."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from exo.api.auth import unauthorized
from exo.master.service import ClusterService
from exo.net.auth import HEADER, AuthError, Throttle
from exo.net.codec import WireError
from exo.net.transport import MAX_FRAME_BYTES, MESSAGE_PATH, MSGPACK, NODE_HEADER
from exo.shared.errors import InvalidRequest

log = logging.getLogger(__name__)


def cluster_router(cluster: ClusterService) -> APIRouter:
    router = APIRouter()
    coordinator, auth = cluster.coordinator, cluster.transport.auth
    refused = Throttle()

    def refuse(host: str, e: AuthError) -> JSONResponse:
        if refused(host):
            log.warning("cluster: refused messages from host=%s: %s", host, e)
        return unauthorized(f"Refused: {e}. Every node of a cluster needs the same --cluster-secret "
                            "(or, where there is none, the same --api-key).", "invalid_cluster_proof", scheme=HEADER)

    @router.post(MESSAGE_PATH, include_in_schema=False)
    async def message(request: Request) -> Response:
        """A peer's frame, answered with this node's id, so the peer names it as the receiver of the next."""
        answer = await _message(request)
        answer.headers[NODE_HEADER] = coordinator.node_id
        return answer

    async def _message(request: Request) -> Response:
        """A peer's frame. With a cluster secret (or an API key), one without a valid proof of it never
        reaches the coordinator: the sender gets 401, and the log a warning (at most one per sender per
        30 s). What can be checked before the body is read (its type, size and the proof's shape, time
        and receiver) is, and no body is read past MAX_FRAME_BYTES."""
        host = request.client.host if request.client else "127.0.0.1"
        if request.headers.get("content-type", "").partition(";")[0].strip().lower() != MSGPACK:
            return _error(415, f"A cluster message is {MSGPACK}.", "unsupported_media_type")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_FRAME_BYTES:
            return _too_large()
        proof = None
        if auth is not None:
            try:
                auth.check(request.headers.get(HEADER))
            except AuthError as e:
                return refuse(host, e)
        frame = bytearray()
        async for chunk in request.stream():
            frame += chunk
            if len(frame) > MAX_FRAME_BYTES:
                return _too_large()
        if auth is not None:
            try:
                proof = auth.verify(request.headers.get(HEADER), bytes(frame))
            except AuthError as e:
                return refuse(host, e)
        try:
            cluster.receive(bytes(frame), host, proof)
        except WireError as e:
            log.warning("dropped a malformed message from %s: %s", request.client, e)
            raise InvalidRequest(f"Malformed cluster message: {e}") from e
        except AuthError as e:
            return refuse(host, e)
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


def _error(status: int, message: str, code: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def _too_large() -> JSONResponse:
    return _error(413, f"A cluster message is at most {MAX_FRAME_BYTES} bytes.", "frame_too_large")
