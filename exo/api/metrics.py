"""GET /metrics: the node's numbers in Prometheus' text format, for dashboards and deployment/alerts.yml.

Two kinds. Events are counted as they happen by the chat service of the node that serves a chat
(`ChatRecord`): requests by outcome, tokens generated, prompts that found their beginning in an
instance's prefix cache and the tokens that saved computing, time to first token and time per token.
A request one node hands to another is counted once, by the node that serves it, labelled
`forwarded="true"`; the entry node counts nothing for it. Values that already live in the node's
parts (runners, queues, the cluster as this node sees it) are read at scrape time by `NodeCollector`.

Labels stay stable: a model's id, a rank, a status, never an id that a new placement changes. The
label sets an alert divides by exist at 0 from the start (a 503 rate is 0, not absent, before the first).
Each app has its own registry, never the process-wide default: several nodes live in one test process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING

import psutil
from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exo import __version__
from exo.master.coordinator import Coordinator
from exo.shared.errors import ExoError
from exo.shared.runners import RunnerStatus, runner_id
from exo.shared.types import InstanceId
from exo.worker.supervisor import RunnerHandle, Supervisor

if TYPE_CHECKING:
    from exo.api.control import Admission

disable_created_metrics()  # a `_created` series per counter and histogram doubles them for nothing Prometheus reads

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"
MESSAGES_ENDPOINT = "/v1/messages"  # Anthropic's
OLLAMA_CHAT_ENDPOINT, OLLAMA_GENERATE_ENDPOINT = "/api/chat", "/api/generate"
ENDPOINTS = (CHAT_ENDPOINT, COMPLETIONS_ENDPOINT, MESSAGES_ENDPOINT, OLLAMA_CHAT_ENDPOINT, OLLAMA_GENERATE_ENDPOINT)
CLIENT_CLOSED_REQUEST = 499  # the outcome of a request whose client went away (as the router answers it)
CODES = ("200", "400", "404", "499", "500", "503")  # the outcomes whose series exist from the start, per model
NODE_MODES = ("serving", "draining", "stopping")
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)  # queueing included
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


class Metrics:
    """One node's registry, the instruments the chat service records into, and the collector of the
    values read at scrape time."""

    def __init__(self, coordinator: Coordinator, supervisor: Supervisor, clock: Callable[[], float],
                 admission: Admission | None = None) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("exo_requests_total", "Chat requests this node served, by HTTP status of the outcome "
                                "(499: the client went away).", ["endpoint", "model", "code", "forwarded"],
                                registry=registry)
        self.tokens = Counter("exo_generated_tokens_total", "Tokens generated for the chats this node served.",
                              ["model"], registry=registry)
        self.prefix_hits = Counter("exo_prefix_cache_hits_total", "Chats whose prompt began with key/values an "
                                   "instance kept from an earlier request.", ["model"], registry=registry)
        self.prefix_tokens = Counter("exo_prefix_cache_tokens_total", "Prompt tokens not computed again, their "
                                     "key/values taken from an instance's prefix cache.", ["model"], registry=registry)
        self.ttft = Histogram("exo_time_to_first_token_seconds", "From a chat request's arrival (queueing included) "
                              "to its first generated token.", ["model"], buckets=TTFT_BUCKETS, registry=registry)
        self.per_token = Histogram("exo_time_per_output_token_seconds", "Time per generated token after a chat's "
                                   "first.", ["model"], buckets=TOKEN_BUCKETS, registry=registry)
        self.models: set[str] = set()
        self.known("")  # a request refused before its model is known
        registry.register(NodeCollector(coordinator, supervisor, clock, admission))
        ProcessCollector(registry=registry)  # process_*: the node's own CPU, memory and open files

    def known(self, model: str) -> None:
        """Create `model`'s series at 0, so that rates and ratios over them exist before the first event."""
        if model in self.models:
            return
        self.models.add(model)
        for code in CODES:
            for forwarded in ("false", "true"):
                for endpoint in ENDPOINTS:
                    self.requests.labels(endpoint, model, code, forwarded)
        if model:
            self.tokens.labels(model)
            self.prefix_hits.labels(model)
            self.prefix_tokens.labels(model)
            self.ttft.labels(model)
            self.per_token.labels(model)

    def chat(self, *, forwarded: bool, endpoint: str = CHAT_ENDPOINT) -> ChatRecord:
        """Start recording a chat (or text completion) request that has just arrived."""
        return ChatRecord(self, forwarded=forwarded, endpoint=endpoint)


class ChatRecord:
    """One chat request as it is served. Used as a context manager, it counts the request on exit
    with its outcome: the status code of an ExoError, 499 when cancelled, 500 for a bug."""

    def __init__(self, metrics: Metrics, *, forwarded: bool, endpoint: str) -> None:
        self.metrics, self.forwarded, self.endpoint = metrics, forwarded, endpoint
        self.model = ""  # set once the catalog knows the model, so no client can invent label values
        self.code = 200
        self.started = time.perf_counter()
        self.last: float | None = None
        self.n_tokens = 0
        self.ended = False

    def served(self, model: str) -> None:
        """The catalog knows the request's model: label it so."""
        self.model = model
        self.metrics.known(model)

    def generated(self, n_tokens: int) -> None:
        """A delta arrived with `n_tokens` generated so far; a delta's gap is spread over its tokens."""
        now, new = time.perf_counter(), n_tokens - self.n_tokens
        if new <= 0:
            return
        if self.last is None:
            self.metrics.ttft.labels(self.model).observe(now - self.started)
        else:
            per_token = self.metrics.per_token.labels(self.model)
            for _ in range(new):
                per_token.observe((now - self.last) / new)
        self.metrics.tokens.labels(self.model).inc(new)
        self.n_tokens, self.last = n_tokens, now

    def cached(self, n_tokens: int) -> None:
        """The chat's prompt began with `n_tokens` its instance had kept (0: it computed all of it)."""
        if n_tokens:
            self.metrics.prefix_hits.labels(self.model).inc()
            self.metrics.prefix_tokens.labels(self.model).inc(n_tokens)

    def fail(self, error: BaseException) -> None:
        self.code = _status(error)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.metrics.requests.labels(self.endpoint, self.model, str(self.code), str(self.forwarded).lower()).inc()

    def __enter__(self) -> ChatRecord:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if error is not None:
            self.fail(error)
        self.end()


def _status(error: BaseException) -> int:
    if isinstance(error, ExoError):
        return error.status_code
    return 500 if isinstance(error, Exception) else CLIENT_CLOSED_REQUEST  # cancelled: the client went away


class NodeCollector(Collector):
    """Values read when Prometheus scrapes: this node's runners and queues, and the cluster as it sees it."""

    def __init__(self, coordinator: Coordinator, supervisor: Supervisor, clock: Callable[[], float],
                 admission: Admission | None = None) -> None:
        self.coordinator, self.supervisor, self.clock, self.admission = coordinator, supervisor, clock, admission

    def collect(self) -> Iterator[Metric]:
        coordinator, supervisor, handles = self.coordinator, self.supervisor, list(self.supervisor.runners.values())
        state = coordinator.state
        info = GaugeMetricFamily("exo_node_info", "This node's id and version (always 1).",
                                 labels=["node_id", "version"])
        info.add_metric([coordinator.node_id, __version__], 1)
        yield info
        yield from self._door()

        runners = GaugeMetricFamily("exo_runners", "This node's runner processes by status.", labels=["status"])
        for status in RunnerStatus:
            runners.add_metric([status.value], sum(h.status == status for h in handles))
        yield runners
        yield CounterMetricFamily("exo_runner_restarts_total", "Runners this node's watchdog restarted.",
                                  value=supervisor.restarts)
        yield CounterMetricFamily("exo_runner_give_ups_total", "Runners this node gave up on after their restarts "
                                  "(the master places their instance again).", value=supervisor.give_ups)
        memory = GaugeMetricFamily("exo_runner_memory_bytes", "Resident memory of each runner process of this node.",
                                   labels=["model", "rank"])
        for h, model in self._models(handles):
            if (rss := _rss(h.process.pid if h.process and h.process.returncode is None else None)) is not None:
                memory.add_metric([model, str(h.spec.rank)], rss)
        yield memory

        # /health's numbers: a runner that owes progress (it has requests, or says it runs) and made none
        yield GaugeMetricFamily("exo_seconds_since_progress", "Longest time a runner of this node that owes "
                                "progress has made none (0 when none owes any); past the watchdog timeout, "
                                "/health says stalled.", value=supervisor.idle_for(time.monotonic()))
        yield GaugeMetricFamily("exo_watchdog_timeout_seconds", "Seconds without progress before the watchdog "
                                "restarts a runner.", value=supervisor.limits.watchdog_timeout)

        queue = GaugeMetricFamily("exo_queue_depth", "Chats in flight (generating or waiting) on the instances of a "
                                  "model whose rank 0 runs here.", labels=["model"])
        limit = GaugeMetricFamily("exo_queue_limit", "Chats in flight at which those instances answer 503.",
                                  labels=["model"])
        depths: dict[str, list[int]] = {}
        for h, model in self._models(handles):
            if h.spec.rank == 0:
                depths.setdefault(model, []).append(len(h.chats))
        for model, each in sorted(depths.items()):
            queue.add_metric([model], sum(each))
            limit.add_metric([model], supervisor.limits.queue * len(each))
        yield queue
        yield limit

        busy = sum(self._generating(h.spec.instance_id) for h in handles)
        yield GaugeMetricFamily("exo_utilization_ratio", "Share of this node's runners whose instance is generating, "
                                "sampled when scraped (avg_over_time gives the share of time).",
                                value=busy / len(handles) if handles else 0.0)

        yield GaugeMetricFamily("exo_master_term", "The election term this node is in.", value=coordinator.term)
        yield GaugeMetricFamily("exo_is_master", "1 if this node is the cluster's master.",
                                value=int(coordinator.is_master))
        yield GaugeMetricFamily("exo_master_known", "1 if this node knows a live master.",
                                value=int(coordinator.master_id is not None))
        yield GaugeMetricFamily("exo_cluster_nodes", "Nodes in the cluster state this node holds.",
                                value=len(state.nodes))
        yield GaugeMetricFamily("exo_instances", "Model instances in the cluster state this node holds.",
                                value=len(state.instances))
        yield GaugeMetricFamily("exo_peers", "Peers this node heard a heartbeat from within the peer timeout.",
                                value=len(coordinator.peers))
        yield CounterMetricFamily("exo_peers_dropped_total", "Peers this node dropped, silent for the peer timeout "
                                  "(a peer that said it leaves is not counted).", value=coordinator.dropped)
        now = self.clock()
        age = GaugeMetricFamily("exo_peer_heartbeat_age_seconds", "Since this node last heard each live peer "
                                "(a peer silent for the peer timeout is dropped).", labels=["peer"])
        for peer, (seen, _) in coordinator.peers.items():
            age.add_metric([peer], max(now - seen, 0.0))
        yield age

    def _door(self) -> Iterator[Metric]:
        """What the node's door admits: its mode (one series per mode, 1 for the current) and its requests."""
        door = self.admission
        current = "serving" if door is None else "stopping" if door.stopping else "draining" if door.draining \
            else "serving"
        mode = GaugeMetricFamily("exo_node_mode", "1 for the mode this node is in: serving, draining (maintenance: "
                                 "new chats get 503), or stopping.", labels=["mode"])
        for name in NODE_MODES:
            mode.add_metric([name], int(name == current))
        yield mode
        yield GaugeMetricFamily("exo_in_flight_requests", "Chat requests that came through this node's API and have "
                                "not ended, streams and forwarded ones included.",
                                value=door.in_flight if door else 0)

    def _models(self, handles: list[RunnerHandle]) -> Iterator[tuple[RunnerHandle, str]]:
        for h in handles:
            instance = self.coordinator.state.instances.get(h.spec.instance_id)
            yield h, instance.model_id if instance else ""

    def _generating(self, instance_id: InstanceId) -> bool:
        """An instance generates while its rank 0 has chats in flight (here) or reports Running (elsewhere);
        every rank of it is busy then, though only rank 0 knows."""
        head = runner_id(instance_id, 0)
        local, reported = self.supervisor.runners.get(head), self.coordinator.state.runners.get(head)
        return bool(local and local.chats) or (reported is not None and reported.status == RunnerStatus.RUNNING)


def _rss(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None  # it exited meanwhile


def metrics_router(metrics: Metrics) -> APIRouter:
    router = APIRouter()

    # async, so the collector reads the node's parts on the event loop that changes them
    @router.get("/metrics", include_in_schema=False)
    async def scrape() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
