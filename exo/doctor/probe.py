"""Asking the node: its /health and /state over HTTP, and a short mDNS browse for the exo services around."""

from __future__ import annotations

import time
from typing import Any

import httpx

from exo.doctor.report import ApiStatus, Browse, ClusterView, PeerSeen, ServiceSeen, StateRunner

HTTP_TIMEOUT_S = 3.0


def ask(url: str, api_key: str | None = None) -> tuple[ApiStatus, dict[str, Any] | None, dict[str, Any] | None]:
    """The API's status at `url`, with its /health and /state bodies (None where they did not come)."""
    health: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S, headers=headers) as client:
            answer = client.get("/health")
            if answer.status_code not in (200, 503):  # 503 comes with the body of a stalled node
                answer.raise_for_status()
            health = answer.json()
            answer = client.get("/state")
            if answer.status_code in (401, 403):
                return ApiStatus(url=url, answering=True, health=health, error=f"GET /state refused "
                                 f"({answer.status_code}): give the cluster's API key in EXO_API_KEY"), health, None
            state = answer.raise_for_status().json()
    except (httpx.HTTPError, ValueError) as e:
        return ApiStatus(url=url, answering=health is not None, error=_describe(e), health=health), health, state
    return ApiStatus(url=url, answering=True, health=health), health, state


def _describe(error: Exception) -> str:
    if isinstance(error, httpx.ConnectError):
        return "connection refused"
    return f"{type(error).__name__}: {error}"[:200]


def cluster_view(state: dict[str, Any]) -> ClusterView | None:
    """The parts of a node's /state that say how it sees the cluster, or None if it is not a /state."""
    try:
        node_id = state["nodeId"]
        profiles = state.get("nodes", {})

        def address(peer: str) -> str | None:
            profile = profiles.get(peer)
            return f"{profile['address']}:{profile['apiPort']}" if profile else None

        peers = [PeerSeen(node_id=n, address=address(n), seconds_since_heartbeat=p.get("secondsSinceHeartbeat"),
                          kernel_path=profiles.get(n, {}).get("kernelPath"))
                 for n, p in state.get("peers", {}).items()]
        own = profiles.get(node_id, {})
        runners = [StateRunner(runner_id=rid, status=r["status"], pid=r.get("pid"), port=r["port"],
                               error=r.get("error"))
                   for rid, r in state.get("runners", {}).items() if r.get("nodeId") == node_id]
        return ClusterView(node_id=node_id, master_id=state.get("masterId"), is_master=bool(state.get("isMaster")),
                           term=int(state.get("term", 0)), nodes=tuple(profiles), peers=tuple(peers),
                           runners=tuple(runners), kernel_path=own.get("kernelPath"),
                           kernel_reason=own.get("kernelReason"))
    except (KeyError, TypeError, ValueError):
        return None


def browse(seconds: float) -> Browse:
    """The `_exo._tcp` services that answer within `seconds` (listen for most of it, then resolve)."""
    from zeroconf import ServiceBrowser, ServiceStateChange, Zeroconf

    from exo.net.discovery import SERVICE_TYPE

    start = time.monotonic()
    names: set[str] = set()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            names.add(name)

    services = []
    try:
        zc = Zeroconf()
    except OSError as e:
        return Browse(ran=True, seconds=time.monotonic() - start, error=f"no multicast socket: {e}")
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        time.sleep(seconds * 0.6)
        browser.cancel()
        for name in sorted(names):
            left_ms = max(100, int((start + seconds - time.monotonic()) * 1000))
            info = zc.get_service_info(SERVICE_TYPE, name, timeout=left_ms)
            props = info.decoded_properties if info else {}
            services.append(ServiceSeen(name=name, node_id=props.get("node_id"), cluster=props.get("cluster"),
                                        version=props.get("version"),
                                        addresses=tuple(info.parsed_addresses()) if info else (),
                                        port=info.port if info else None))
    except Exception as e:  # noqa: BLE001 - a browse that fails is reported, it must not stop the diagnosis
        return Browse(ran=True, seconds=time.monotonic() - start, services=tuple(services), error=repr(e))
    finally:
        zc.close()
    return Browse(ran=True, seconds=time.monotonic() - start, services=tuple(services))
