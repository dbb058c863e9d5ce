"""Peers' requests for the models this node serves from its own files (see exo/models/peers.py).

Not the API's: the API key does not open them. Where the cluster has a secret (or an API key), each
request proves it, signed over its method and request line as frames are, and is taken once."""

from __future__ import annotations

import logging
from typing import Annotated

import anyio
from fastapi import APIRouter, Path, Query, Request, Response

from exo.api.auth import unauthorized
from exo.api.limits import ModelIdStr
from exo.models.peers import PIECE_BYTES, ModelServer, signed_frame
from exo.net.auth import HEADER, AuthError, ClusterAuth, Throttle
from exo.shared.errors import InvalidRequest

log = logging.getLogger(__name__)

PREFIX = "/cluster/models/"
_MAX_OFFSET = 1 << 50


def peer_models_router(server: ModelServer, auth: ClusterAuth | None) -> APIRouter:
    router = APIRouter(prefix=PREFIX.rstrip("/"), include_in_schema=False)
    refused = Throttle()

    def prove(request: Request) -> Response | None:
        """None where the request proves the cluster secret (or there is none); else the 401 to answer."""
        if auth is None:
            return None
        line = request.scope["raw_path"].decode("latin-1")
        if query := request.scope["query_string"].decode("latin-1"):
            line += f"?{query}"
        try:
            auth.verify(request.headers.get(HEADER), signed_frame(request.method, line))
        except AuthError as e:
            host = request.client.host if request.client else "?"
            if refused(host):
                log.warning("models: refused a request from host=%s: %s", host, e)
            return unauthorized(f"Refused: {e}. Only nodes of this cluster fetch its models.", "invalid_cluster_proof",
                                scheme=HEADER)
        return None

    @router.get("/{model_id}/manifest", response_model=None)
    async def manifest(model_id: Annotated[ModelIdStr, Path()], request: Request,
                       start: Annotated[int | None, Query(ge=0, le=10_000)] = None,
                       end: Annotated[int | None, Query(ge=1, le=10_000)] = None) -> Response:
        if (refusal := prove(request)) is not None:
            return refusal
        if (start is None) != (end is None):
            raise InvalidRequest("Give both start and end, or neither.", param="start")
        layers = (start, end) if start is not None and end is not None else None
        found = await anyio.to_thread.run_sync(server.manifest, model_id, layers)
        return Response(found.model_dump_json(), media_type="application/json")

    @router.get("/{model_id}/piece", response_model=None)
    async def piece(model_id: Annotated[ModelIdStr, Path()], request: Request,
                    file: Annotated[str, Query(min_length=1, max_length=255)],
                    offset: Annotated[int, Query(ge=0, le=_MAX_OFFSET)],
                    length: Annotated[int, Query(ge=1, le=PIECE_BYTES)]) -> Response:
        if (refusal := prove(request)) is not None:
            return refusal
        data = await anyio.to_thread.run_sync(server.piece, model_id, file, offset, length)
        return Response(data, media_type="application/octet-stream")

    return router
