"""Handing an API request to another node (the master, or the node that holds a runner).

It goes with this node's API key, if it has one: the nodes of a cluster share one (see exo/api/auth.py).
`url` comes from PeerTransport.url, an address learned from a frame that proved the key (or the secret).
"""

from __future__ import annotations

import httpx

from exo.api.auth import forward_headers
from exo.shared.errors import ExoError, ServiceUnavailable

FORWARD_TIMEOUT = 10.0


async def ask_node(url: str, method: str, path: str, body: bytes, *, who: str) -> httpx.Response:
    """Send a JSON request to the node at `url`; ServiceUnavailable, naming `who`, if it does not answer,
    and an ExoError if it refuses this node's API key (its own 401 would blame the caller's key)."""
    try:
        async with httpx.AsyncClient(timeout=FORWARD_TIMEOUT) as client:
            answer = await client.request(method, url + path, content=body,
                                          headers={"Content-Type": "application/json", **forward_headers()})
    except httpx.HTTPError as e:
        raise ServiceUnavailable(f"{who} did not answer ({type(e).__name__}); retry shortly.") from e
    if answer.status_code == 401:
        raise ExoError(f"{who} refused this node's API key: give every node of the cluster the same --api-key.")
    return answer
