"""deployment/alerts.yml in a real Prometheus scraping two real exo nodes on loopback, while the test
provokes the failures the rules name, one after another on one cluster: a full queue, a runner stopped
with SIGSTOP, a runner killed past its restarts, a drained node, a paused master, a killed node.

Prometheus runs from Debian's `prometheus` package in its own temp dir, on a loopback port, scraping
every second and evaluating every 0.5 s. The test templates the rules file: every `for:` longer than 0
becomes 1 s (the windows of rate() and increase() stay as written; tests/deployment/test_alerts.py covers
the real `for:` durations with promtool). That an alert went through pending is read afterwards from
Prometheus' own ALERTS series. Not provoked here: election churn and two masters (tests/master simulate
them), slow first tokens and slow generation (they need minutes of slow traffic; promtool covers them).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from nodes import RunningNode, free_ports, node_pair, runner_pids, wait_for

from exo import local_cluster
from exo.models.cards import DEFAULT_MODEL
from exo.worker.supervisor import STOP_GRACE_SECONDS, WATCHDOG_PERIOD, Limits

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus is not installed (Debian's `prometheus` package; deployment/setup.sh --dev installs it)")]

ALERTS = Path(__file__).resolve().parents[2] / "deployment" / "alerts.yml"
DOCS = "https://docs.example/exo"
WATCHDOG_TIMEOUT = 8.0
QUEUE_LIMIT = 2
NODE_ENV = {"EXO_WATCHDOG_TIMEOUT": str(WATCHDOG_TIMEOUT), "EXO_MAX_RESTARTS": "1",
            "EXO_QUEUE_LIMIT": str(QUEUE_LIMIT), "EXO_PEER_TIMEOUT": "3"}
REPLACED_WITHIN = WATCHDOG_TIMEOUT + WATCHDOG_PERIOD + 2 * STOP_GRACE_SECONDS + Limits().restart_backoff
LOAD_SECONDS = 60  # for a runner to load the model, on a loaded machine
ALERT_SECONDS = 30  # scrape, evaluation and a `for:` of 1 s, on a loaded machine
LONG = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 4000, "temperature": 0}


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def alerts(self) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/alerts", timeout=5).json()
        return list(answer["data"]["alerts"])

    def firing(self, name: str, **labels: str) -> dict[str, Any]:
        """Wait until alert `name` with `labels` fires; it, as the API shows it."""
        found: list[dict[str, Any]] = []

        def fires() -> bool:
            found[:] = [a for a in self.alerts() if a["labels"]["alertname"] == name and a["state"] == "firing"
                        and labels.items() <= a["labels"].items()]
            return bool(found)

        try:
            wait_for(fires, ALERT_SECONDS, f"{name} {labels} to fire")
        except TimeoutError:
            raise AssertionError(f"{name} {labels} did not fire; alerts: {self.alerts()}") from None
        return found[0]

    def was_pending(self, name: str, **labels: str) -> bool:
        """Whether Prometheus recorded alert `name` pending in the last 5 minutes (its ALERTS series)."""
        selector = ",".join([f'alertname="{name}"', 'alertstate="pending"', *(f'{k}="{v}"' for k, v in labels.items())])
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": f"max_over_time(ALERTS{{{selector}}}[5m])"},
                           timeout=5).json()
        return bool(answer["data"]["result"])


def templated_rules(path: Path) -> None:
    """The rules with every `for:` of more than 0 at 1 s."""
    path.write_text(re.sub(r"for: (?!0m)\d+[smh]", "for: 1s", ALERTS.read_text()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[list[RunningNode]]:
    root = tmp_path_factory.mktemp("alerted")
    with node_pair([root / "entry", root / "server"], models_dir, "--no-preload", env=NODE_ENV) as nodes:
        local_cluster.place(nodes, nodes[1:], DEFAULT_MODEL, [(0, 30)], timeout=120)  # rank 0 on the server
        yield nodes


@pytest.fixture(scope="module")
def prometheus(cluster: list[RunningNode], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    home = tmp_path_factory.mktemp("prometheus")
    templated_rules(home / "alerts.yml")
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "500ms",
                         "external_labels": {"exo_docs": DOCS}},
              "rule_files": [str(home / "alerts.yml")],
              "scrape_configs": [{"job_name": "exo", "static_configs": [{"targets": [f"127.0.0.1:{n.port}"
                                                                                     for n in cluster]}]}]}
    (home / "prometheus.yml").write_text(yaml.safe_dump(config))
    [port] = free_ports(1)
    log = home / "prometheus.log"
    with log.open("ab") as out:
        process = subprocess.Popen(["prometheus", f"--config.file={home / 'prometheus.yml'}",
                                    f"--storage.tsdb.path={home / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                    "--log.level=warn"], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    prom = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_for(lambda: _ready(prom), 30, "prometheus to be ready")
        wait_for(lambda: _all_up(prom, len(cluster)), 30, "prometheus to scrape both nodes")
        yield prom
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ready(prom: Prometheus) -> bool:
    try:
        return httpx.get(f"{prom.url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _all_up(prom: Prometheus, n: int) -> bool:
    result = httpx.get(f"{prom.url}/api/v1/query", params={"query": 'up{job="exo"} == 1'}, timeout=5).json()
    return len(result["data"]["result"]) == n


def target(node: RunningNode) -> str:
    return f"127.0.0.1:{node.port}"


class Streams:
    """Streamed chats held open by threads until `close`; each records its status code and its events."""

    def __init__(self) -> None:
        self.stop, self.threads = threading.Event(), []
        self.codes: list[int] = []
        self.first = threading.Semaphore(0)  # released at each stream's first text, or its refusal

    def open(self, node: RunningNode) -> None:
        thread = threading.Thread(target=self._read, args=(node,))
        self.threads.append(thread)
        thread.start()

    def _read(self, node: RunningNode) -> None:
        with httpx.stream("POST", f"{node.url}/v1/chat/completions", json={**LONG, "stream": True},
                          timeout=120) as response:
            self.codes.append(response.status_code)
            released = False
            for line in response.iter_lines():
                if not released and ('"content"' in line or response.status_code != 200):
                    self.first.release()
                    released = True
                if self.stop.is_set():
                    break
            if not released:
                self.first.release()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


def served(node: RunningNode) -> None:
    answer = httpx.post(f"{node.url}/v1/chat/completions", json={**LONG, "max_tokens": 4}, timeout=120)
    assert answer.status_code == 200, answer.text


def ready_runners(node: RunningNode) -> int:
    return int(httpx.get(f"{node.url}/health", timeout=5).json()["runners_ready"])


def test_each_alert_fires_for_the_failure_it_names(cluster: list[RunningNode], prometheus: Prometheus) -> None:
    entry, server = cluster
    step: Callable[[str], None] = lambda what: print(f"{time.strftime('%H:%M:%S')} {what}", flush=True)  # noqa: E731

    step("a full queue: one chat more than the server's limit")
    streams = Streams()
    for _ in range(QUEUE_LIMIT + 1):
        streams.open(server)
    for _ in range(QUEUE_LIMIT + 1):
        streams.first.acquire(timeout=120)
    try:
        assert sorted(streams.codes) == [200] * QUEUE_LIMIT + [503]
        saturated = prometheus.firing("ExoQueueSaturated", instance=target(server), model=DEFAULT_MODEL)
        assert saturated["annotations"]["summary"] == f"the {DEFAULT_MODEL} queue on {target(server)} is 100% full"
        assert saturated["annotations"]["runbook_url"] == f"{DOCS}/operations.md#queue-saturated"
    finally:
        streams.close()
    prometheus.firing("ExoRequestsRejected", instance=target(server))

    step("a runner stopped with SIGSTOP under a chat: stalled, then replaced by the watchdog")
    wait_for(lambda: httpx.get(f"{server.url}/health", timeout=5).json()["queue_depth"] == 0, 30, "an empty queue")
    streams = Streams()
    streams.open(server)
    streams.first.acquire(timeout=120)
    [pid] = runner_pids(server.process.pid)
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        stalled = prometheus.firing("ExoGenerationStalled", instance=target(server))
        summary = re.fullmatch(rf"exo node {re.escape(target(server))} has made no progress on its requests for "
                               r"([\d.]+)s", stalled["annotations"]["summary"])
        assert summary and float(summary[1]) > WATCHDOG_TIMEOUT, stalled  # true when it fires
        prometheus.firing("ExoRunnerRestarting", instance=target(server))
        wait_for(lambda: ready_runners(server) == 1 and pid not in runner_pids(server.process.pid),
                 REPLACED_WITHIN + LOAD_SECONDS - (time.monotonic() - stopped), "the hung runner to be replaced")
    finally:
        streams.close()
    served(entry)  # forwarded to the server's new runner
    assert prometheus.was_pending("ExoGenerationStalled", instance=target(server))

    step("a runner killed past its restarts (EXO_MAX_RESTARTS=1; the watchdog restarted it once already)")
    [pid] = runner_pids(server.process.pid)
    os.kill(pid, signal.SIGKILL)
    failed = prometheus.firing("ExoRunnerFailed", instance=target(server))
    assert failed["annotations"]["summary"] == f"exo node {target(server)} gave up on 1 runner(s) in 15 minutes"

    step("a drained node: its 503s are counted and the drain is seen")
    drain = httpx.post(f"{entry.url}/control/maintenance", json={"mode": "drain"}, timeout=10)
    assert drain.status_code == 200, drain.text
    refused = httpx.post(f"{entry.url}/v1/chat/completions", json={**LONG, "max_tokens": 4}, timeout=30)
    assert refused.status_code == 503
    prometheus.firing("ExoNodeDraining", instance=target(entry), mode="draining")
    prometheus.firing("ExoRequestsRejected", instance=target(entry))
    assert httpx.post(f"{entry.url}/control/maintenance", json={"mode": "normal"}, timeout=10).status_code == 200

    step("the master paused for 2.6 s, under the 3 s peer timeout: its heartbeats come late")
    master_id = server.state()["masterId"]
    master, other = (entry, server) if entry.state()["nodeId"] == master_id else (server, entry)
    master.process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(2.6)  # over 1.5 s for longer than a scrape interval
    finally:
        master.process.send_signal(signal.SIGCONT)
    prometheus.firing("ExoPeerHeartbeatLate", instance=target(other))
    assert server.state()["masterId"] == master_id  # a pause under the timeout costs no election

    step("a node killed")
    entry.process.kill()
    entry.process.wait()
    down = prometheus.firing("ExoNodeDown", instance=target(entry))
    assert down["annotations"]["runbook_url"] == f"{DOCS}/operations.md#node-down"
    prometheus.firing("ExoPeerDropped", instance=target(server))
    missing = prometheus.firing("ExoPeerMissing", instance=target(server))
    assert missing["annotations"]["summary"] == f"exo node {target(server)} hears 1 of the cluster's nodes " \
                                                "(itself included)"
    for name, instance in (("ExoQueueSaturated", server), ("ExoNodeDraining", entry), ("ExoNodeDown", entry),
                           ("ExoPeerMissing", server)):
        assert prometheus.was_pending(name, instance=target(instance)), name
