"""GET /metrics in Prometheus' text format, and the alert rules in deployment/alerts.yml that read it.

The live tests scrape the session's real node around one short chat and read the scrape with the
Prometheus client's own parser; the others build a node's Metrics from a coordinator and a
supervisor without processes, so every metric has a series to check the alert rules against.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml
from fastapi import FastAPI
from nodes import idle_health
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from exo.api.metrics import Metrics, metrics_router
from exo.master.coordinator import Coordinator
from exo.models.cards import DEFAULT_MODEL
from exo.models.catalog import ModelCatalog
from exo.models.store import ModelStore
from exo.shared.errors import ServiceUnavailable
from exo.shared.events import InstanceCreated
from exo.shared.runners import RunnerStatus
from exo.shared.state import Instance, NodeProfile, ShardAssignment
from exo.shared.types import InstanceId, NodeId
from exo.worker.runner.messages import RunnerSpec
from exo.worker.supervisor import Limits, RunnerHandle, Supervisor

ALERTS = Path(__file__).resolve().parents[2] / "deployment" / "alerts.yml"
CHAT = "/v1/chat/completions"


def parse(text: str) -> dict[str, list[Sample]]:
    """Samples by name (`exo_requests_total`, `exo_time_to_first_token_seconds_count`, ...)."""
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        samples.setdefault(family.name, [])  # a family with no series yet still exists
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    """The sum of the series of `name` whose labels include `labels` (0 if there is none)."""
    return sum(s.value for s in samples.get(name, []) if labels.items() <= s.labels.items())


async def scrape(client: httpx.AsyncClient) -> dict[str, list[Sample]]:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse(response.text)


# -- a real node, serving the real model ---------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_a_chat_shows_in_the_metrics(client: httpx.AsyncClient) -> None:
    await idle_health(client)
    before = await scrape(client)
    request = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Count from 1 to 20."}],
               "max_tokens": 6}
    response = await client.post(CHAT, json=request)
    assert response.status_code == 200, response.text
    completion_tokens = response.json()["usage"]["completion_tokens"]
    await idle_health(client)
    after = await scrape(client)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    model = {"model": DEFAULT_MODEL}
    assert grew("exo_requests_total", endpoint=CHAT, code="200", forwarded="false", **model) == 1
    assert grew("exo_requests_total") == 1  # and nothing else
    assert grew("exo_generated_tokens_total", **model) >= completion_tokens >= 1
    assert grew("exo_time_to_first_token_seconds_count", **model) == 1
    assert 0 < grew("exo_time_to_first_token_seconds_sum", **model) < 60
    if completion_tokens >= 2:  # the tokens after the first, as far as they came in deltas of their own
        assert 1 <= grew("exo_time_per_output_token_seconds_count", **model) <= completion_tokens - 1
    assert value(after, "exo_runners", status="Ready") == 1
    assert value(after, "exo_runners", status="Failed") == 0  # every status has its series, 0 when none
    assert {s.labels["status"] for s in after["exo_runners"]} == {s.value for s in RunnerStatus}
    assert value(after, "exo_master_term") >= 1
    assert value(after, "exo_is_master") == value(after, "exo_master_known") == 1
    assert value(after, "exo_cluster_nodes") == 1 and value(after, "exo_instances") == 1
    assert value(after, "exo_peers") == 0 and after["exo_peer_heartbeat_age_seconds"] == []
    [queue] = after["exo_queue_depth"]
    assert (queue.labels["model"], queue.value) == (DEFAULT_MODEL, 0)
    assert value(after, "exo_queue_limit", model=DEFAULT_MODEL) >= 1
    assert value(after, "exo_utilization_ratio") == 0
    assert value(after, "exo_runner_restarts_total") >= 0
    assert value(after, "exo_runner_memory_bytes", model=DEFAULT_MODEL, rank="0") > 10 << 20  # the runner holds it
    assert value(after, "exo_node_mode", mode="serving") == 1 and value(after, "exo_node_mode") == 1
    assert value(after, "exo_in_flight_requests") == 0 and value(after, "exo_seconds_since_progress") == 0
    assert value(after, "process_resident_memory_bytes") > 0


@pytest.mark.asyncio(loop_scope="session")
async def test_a_streamed_chat_counts_once_and_an_abandoned_one_as_client_closed(client: httpx.AsyncClient) -> None:
    await idle_health(client)
    before = await scrape(client)
    request = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Count from 1 to 50."}],
               "stream": True, "max_tokens": 6}
    async with client.stream("POST", CHAT, json=request) as response:
        assert response.status_code == 200
        assert [line async for line in response.aiter_lines() if line][-1] == "data: [DONE]"
    async with client.stream("POST", CHAT, json={**request, "max_tokens": 200}) as response:
        async for line in response.aiter_lines():
            if '"content"' in line and '"role"' not in line:
                break  # the first text: hang up while it generates
    for _ in range(500):
        after = await scrape(client)
        if value(after, "exo_requests_total", code="499") > value(before, "exo_requests_total", code="499"):
            break
        await asyncio.sleep(0.01)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("exo_requests_total", code="200", model=DEFAULT_MODEL) == 1
    assert grew("exo_requests_total", code="499", model=DEFAULT_MODEL) == 1
    assert grew("exo_time_to_first_token_seconds_count") == 2
    assert (await idle_health(client))["queue_depth"] == 0


@pytest.mark.asyncio(loop_scope="session")
async def test_a_refused_chat_is_counted_with_its_status_and_no_client_chosen_label(client: httpx.AsyncClient) -> None:
    before = await scrape(client)
    response = await client.post(CHAT, json={"model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 404
    after = await scrape(client)
    assert value(after, "exo_requests_total", code="404", model="") - value(before, "exo_requests_total",
                                                                             code="404", model="") == 1
    assert not any(s.labels["model"] == "no-such-model" for s in after["exo_requests_total"])


# -- a node's Metrics without processes ----------------------------------------------------------


def profile(node_id: str) -> NodeProfile:
    return NodeProfile(node_id=NodeId(node_id), hostname=node_id, version="0.1.0", address="127.0.0.1",
                       api_port=52415, memory_total=16 << 30, memory_available=8 << 30, cpu_count=8,
                       accelerator="cpu", mlx_device="cpu")


def busy_node_metrics(tmp_path: Path) -> tuple[Metrics, list[Any]]:
    """Metrics of node `a`: master of a two-node cluster, with one instance generating one chat on it
    and a peer `b` last heard 0.25 s ago. Also returns the chat's stream, to close."""
    a = Coordinator(profile("a"), cluster="exo")
    a.tick(0.0)
    a.tick(2.0)  # settled: claims term 1
    a.receive(Coordinator(profile("b"), cluster="exo").heartbeat(), 2.0)
    instance = Instance(instance_id=InstanceId("i1"), model_id="m", n_layers=4,
                        shards=(ShardAssignment(node_id=NodeId("a"), rank=0, start=0, end=4),))
    a.emit(lambda i, t: InstanceCreated(index=i, term=t, instance=instance))
    supervisor = Supervisor(NodeId("a"), ModelCatalog(ModelStore(tmp_path)), host="127.0.0.1", dtype="float32",
                            report=lambda *worker: None)
    spec = RunnerSpec(node_id="a", instance_id=instance.instance_id, rank=0, world_size=1, model_path="", start=0,
                      end=4, n_layers=4, dtype="float32")
    handle = RunnerHandle(spec, NodeId("a"), "127.0.0.1", 1, status=RunnerStatus.RUNNING)
    send, receive = anyio.create_memory_object_stream[Any](1)
    handle.chats["t1"] = send
    supervisor.runners[handle.runner_id] = handle
    return Metrics(a, supervisor, clock=lambda: 2.25), [send, receive]


async def test_metrics_record_chats_and_read_the_node_when_scraped(tmp_path: Path) -> None:
    metrics, streams = busy_node_metrics(tmp_path)
    with metrics.chat(forwarded=True) as served:
        served.served("m")
        await asyncio.sleep(0.01)
        served.generated(1)
        served.generated(1)  # a delta with no new token
        await asyncio.sleep(0.01)
        served.generated(3)  # two tokens in one delta: the gap is spread over them
    with pytest.raises(ServiceUnavailable), metrics.chat(forwarded=False) as refused:
        refused.served("m")
        raise ServiceUnavailable("no instance")
    with pytest.raises(asyncio.CancelledError), metrics.chat(forwarded=False) as gone:
        gone.served("m")
        raise asyncio.CancelledError

    app = FastAPI()
    app.include_router(metrics_router(metrics))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as client:
        samples = await scrape(client)
    for stream in streams:
        stream.close()

    requests = {(s.labels["code"], s.labels["forwarded"]): s.value for s in samples["exo_requests_total"]
                if s.labels["model"] == "m" and s.value}
    assert requests == {("200", "true"): 1, ("503", "false"): 1, ("499", "false"): 1}
    assert value(samples, "exo_generated_tokens_total", model="m") == 3
    assert value(samples, "exo_time_to_first_token_seconds_count", model="m") == 1
    assert value(samples, "exo_time_to_first_token_seconds_sum", model="m") >= 0.01
    assert value(samples, "exo_time_per_output_token_seconds_count", model="m") == 2
    assert 0.004 <= value(samples, "exo_time_per_output_token_seconds_sum", model="m") / 2 < 1
    assert value(samples, "exo_time_per_output_token_seconds_bucket", model="m", le="+Inf") == 2
    [queue] = samples["exo_queue_depth"]  # by model: no label that a new placement changes
    assert (queue.labels, queue.value) == ({"model": "m"}, 1)
    assert value(samples, "exo_queue_limit", model="m") == Limits().queue
    assert value(samples, "exo_utilization_ratio") == 1
    assert value(samples, "exo_runners", status="Running") == 1 and value(samples, "exo_runners") == 1
    assert value(samples, "exo_runner_restarts_total") == value(samples, "exo_runner_give_ups_total") == 0
    assert value(samples, "exo_seconds_since_progress") > 0  # the runner says it runs: it owes progress
    assert value(samples, "exo_watchdog_timeout_seconds") == Limits().watchdog_timeout
    assert value(samples, "exo_peers_dropped_total") == 0
    assert value(samples, "exo_in_flight_requests") == 0
    assert {s.labels["mode"]: s.value for s in samples["exo_node_mode"]} == {"serving": 1, "draining": 0,
                                                                             "stopping": 0}
    assert samples["exo_runner_memory_bytes"] == []  # the runner has no process here
    assert (value(samples, "exo_master_term"), value(samples, "exo_is_master")) == (1, 1)
    assert (value(samples, "exo_cluster_nodes"), value(samples, "exo_instances"), value(samples, "exo_peers")) == (
        1, 1, 1)  # b is heard, but joins the state at the master's next tick
    assert value(samples, "exo_peer_heartbeat_age_seconds", peer="b") == 0.25
    assert value(samples, "exo_node_info", node_id="a") == 1
    assert value(samples, "process_resident_memory_bytes") > 0
    assert not [name for name in samples if name.endswith("_created")]


async def test_the_series_alerts_divide_by_exist_at_zero_before_their_first_event(tmp_path: Path) -> None:
    metrics, streams = busy_node_metrics(tmp_path)
    with metrics.chat(forwarded=False) as chat:
        chat.served("m")
    for stream in streams:
        stream.close()
    app = FastAPI()
    app.include_router(metrics_router(metrics))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as client:
        samples = await scrape(client)
    for model in ("", "m"):  # "" for a request refused before its model is known (a draining node's)
        for code in ("200", "499", "503"):
            for endpoint in ("/v1/chat/completions", "/v1/completions"):
                [series] = [s for s in samples["exo_requests_total"] if (
                    s.labels["endpoint"], s.labels["model"], s.labels["code"], s.labels["forwarded"]) == (
                    endpoint, model, code, "false")]
                assert series.value == (1 if (endpoint, model, code) == ("/v1/chat/completions", "m", "200") else 0)
    assert value(samples, "exo_generated_tokens_total", model="m") == 0
    assert value(samples, "exo_time_to_first_token_seconds_bucket", model="m", le="300.0") == 0  # past 30 s


# -- deployment/alerts.yml -----------------------------------------------------------------------

PROMETHEUS_SERIES = {"up"}  # made by Prometheus itself for each target


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


async def test_every_alert_rule_is_complete_and_reads_only_metrics_a_node_exports(tmp_path: Path) -> None:
    metrics, streams = busy_node_metrics(tmp_path)
    with metrics.chat(forwarded=False) as chat:  # so every labelled family has series
        chat.served("m")
        chat.generated(1)
        chat.generated(2)
    for stream in streams:
        stream.close()
    app = FastAPI()
    app.include_router(metrics_router(metrics))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as client:
        exported = set(await scrape(client))

    rules = alert_rules()
    assert len(rules) >= 15
    assert len({r["alert"] for r in rules}) == len(rules)
    used = set()
    for rule in rules:
        assert {"alert", "expr", "for", "labels", "annotations"} <= rule.keys(), rule
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule
        assert rule["labels"]["severity"] in ("critical", "warning"), rule
        assert rule["annotations"]["summary"], rule
        assert rule["annotations"]["runbook_url"].startswith("{{ $externalLabels.exo_docs }}/operations.md#"), rule
        names = set(re.findall(r"\b(exo_[a-z0-9_]+|up)\b", rule["expr"]))
        assert names, f"{rule['alert']} reads no metric"
        assert names <= exported | PROMETHEUS_SERIES, f"{rule['alert']} reads {names - exported - PROMETHEUS_SERIES}"
        used |= names
    # the failures the runbook covers, each watched
    assert {"up", "exo_master_known", "exo_master_term", "exo_is_master", "exo_peers", "exo_peers_dropped_total",
            "exo_peer_heartbeat_age_seconds", "exo_runner_give_ups_total", "exo_runner_restarts_total",
            "exo_queue_depth", "exo_queue_limit", "exo_requests_total", "exo_node_mode",
            "exo_time_to_first_token_seconds_bucket", "exo_time_per_output_token_seconds_bucket",
            "exo_seconds_since_progress", "exo_watchdog_timeout_seconds"} <= used
