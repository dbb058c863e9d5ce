"""Handing an API request to another node (the master, or the node that holds a runner)."""

from __future__ import annotations

import httpx

from exo.shared.errors import ServiceUnavailable

FORWARD_TIMEOUT = 10.0


async def ask_node(url: str, method: str, path: str, body: bytes, *, who: str) -> httpx.Response:
    """Send a JSON request to the node at `url`; ServiceUnavailable, naming `who`, if it does not answer."""
    try:
        async with httpx.AsyncClient(timeout=FORWARD_TIMEOUT) as client:
            return await client.request(method, url + path, content=body, headers={"Content-Type": "application/json"})
    except httpx.HTTPError as e:
        raise ServiceUnavailable(f"{who} did not answer ({type(e).__name__}); retry shortly.") from e
