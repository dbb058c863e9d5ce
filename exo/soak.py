"""`exo soak`: real nodes under random load, restarts and cancels for a set time; what was lost.

It starts N nodes on loopback, places the default model, then for `--duration` seconds runs client
workers that send chats of random sizes to random nodes, streamed or not, some of them closed by
the client on purpose, while a node is restarted (SIGTERM, or SIGKILL for `--kill-fraction` of them)
every `--restart-every` seconds. Every request ends in one of four outcomes:

    served     200 and complete: a finish_reason (and, streamed, `[DONE]` with no error event)
    failed     a clean refusal: an error status with OpenAI's error body, an error event then `[DONE]`,
               or a refused connection to a node that was restarting (or cut, when it was SIGKILLed)
    cancelled  closed by the client on purpose
    lost       anything else: a timeout, a stream cut without `[DONE]`, a malformed answer

A client that gets a failure waits half a second before its next request. The run fails (exit 1) if
a request was lost, a runner outlived its node, a node exited badly or its log shows a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil

from exo.local_cluster import LocalNode, place, start_node, static_peers, untag, wait_for
from exo.models.cards import CARDS, DEFAULT_MODEL
from exo.models.store import ModelStore
from exo.shared.runners import RunnerStatus
from exo.shared.types import FrozenModel
from exo.worker.profile import free_ports
from exo.worker.runner.process import runner_pids

log = logging.getLogger(__name__)

READY_TIMEOUT = 240.0    # the first placement: runners loading and warming up on a small machine
REJOIN_TIMEOUT = 60.0    # a restarted node back in the cluster, every node agreeing on it
STOP_TIMEOUT = 60.0      # a node's three-phase stop is bounded by 30 + 5 + 10 s
RUNNER_EXIT_TIMEOUT = 10.0
SAMPLE_PERIOD = 0.5
FAILURE_PAUSE = 0.5
LOG_MARKERS = ("Traceback", "Queue is closed", "ClosedResourceError")  # a bug wherever they show
WORDS = ("the lighthouse keeper found a message in a bottle on the rocks one stormy night and read it "
         "slowly by lamp light while the sea kept beating against old stone walls far below").split()


class Outcome(StrEnum):
    SERVED = "served"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    reason: str | None = None  # why it failed or was lost, as a histogram key
    latency_s: float = 0.0
    tokens: int = 0


class NodeMemory(FrozenModel):
    """A node's peak resident memory with its runners (over all its incarnations)."""

    node: int
    port: int
    peak_mb: float  # node plus runners, at the sample where their sum peaked
    peak_node_mb: float
    peak_runners_mb: float


class SoakReport(FrozenModel):
    nodes: int
    model: str
    seed: int
    split: bool
    concurrency: int
    duration_s: float  # the load phase as it ran, requests still in flight at its end included
    restart_every_s: float
    kill_fraction: float
    cancel_fraction: float
    max_tokens: int
    max_prompt_tokens: int
    requests: int
    served: int
    failed: int
    cancelled: int
    lost: int
    failure_reasons: dict[str, int]
    lost_reasons: dict[str, int]
    latency_p50_s: float | None  # of served requests, from sending to the last byte
    latency_p95_s: float | None
    completion_tokens: int  # of served requests
    tokens_per_s: float  # completion tokens served over the load phase
    memory: list[NodeMemory]
    restarts: int
    kills: int
    restart_s: list[float]  # each restart, from the signal until every node agreed on the cluster again
    orphans: list[int]  # runners that outlived their node, after a restart or at the end
    exit_codes: list[int]  # of the nodes' final SIGTERM stop
    log_markers: dict[str, int]  # lines with a bug marker in the nodes' logs
    log_errors: list[str]  # the nodes' ERROR and CRITICAL lines and bug markers, first of each kind
    problems: list[str]
    ok: bool


# -- classifying what a request got back ---------------------------------------------------------


def error_reason(status: int, body: str) -> str | None:
    """`STATUS message-prefix` for an answer with OpenAI's error body; None for any other body."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None
    return f"{status} {message_prefix(error['message'])}"


def message_prefix(message: str) -> str:
    """The first sentence of an error message with ids and numbers blanked, so alike errors count together."""
    first = re.split(r"(?<=[.;])\s", message, maxsplit=1)[0]
    first = re.sub(r"\b[0-9a-f]{8,}(\.\d+)?\b", "<id>", first)
    return re.sub(r"\b\d+(\.\d+)?s?\b", "N", first)[:100]


def completion_result(body: str) -> tuple[Outcome, str | None, int]:
    """A non-streamed 200: served if it holds a choice with a finish_reason."""
    try:
        answer = json.loads(body)
        choice = answer["choices"][0]
        if choice["finish_reason"] and isinstance(choice["message"]["content"], str):
            return Outcome.SERVED, None, int(answer["usage"]["completion_tokens"])
    except (ValueError, KeyError, IndexError, TypeError):
        pass
    return Outcome.LOST, "200 with a malformed completion", 0


@dataclass
class StreamTally:
    """What a streamed answer said so far, fed line by line."""

    chunks: int = 0  # with content
    tokens: int = 0
    finish: str | None = None
    error: str | None = None
    done: bool = False
    malformed: bool = False
    cut: str | None = None  # the transport error that ended it early

    def feed(self, line: str) -> None:
        if not line.startswith("data: ") or self.done:
            return
        data = line[len("data: "):]
        if data == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
            if "error" in chunk:
                self.error = f"stream error: {message_prefix(chunk['error']['message'])}"
                return
            for choice in chunk.get("choices", []):
                self.chunks += bool(choice["delta"].get("content"))
                self.finish = choice.get("finish_reason") or self.finish
            if usage := chunk.get("usage"):
                self.tokens = int(usage["completion_tokens"])
        except (ValueError, KeyError, TypeError, AttributeError):
            self.malformed = True

    def verdict(self) -> tuple[Outcome, str | None]:
        """Once the stream has ended (or was cut)."""
        if self.malformed:
            return Outcome.LOST, "malformed stream chunk"
        if self.done and self.error:
            return Outcome.FAILED, self.error
        if self.done and self.finish:
            return Outcome.SERVED, None
        if self.done:
            return Outcome.LOST, "[DONE] without a finish_reason or an error"
        how = f" ({self.cut})" if self.cut else ""
        return Outcome.LOST, "stream cut without [DONE]" + (" after an error event" if self.error else "") + how


# -- the nodes -----------------------------------------------------------------------------------


@dataclass
class _Window:
    """A node's restart, from its signal until the cluster agrees on it again."""

    node: int
    start: float
    kill: bool
    end: float | None = None

    @property
    def seconds(self) -> float:
        return (self.end or time.monotonic()) - self.start

    def overlaps(self, start: float, end: float) -> bool:
        return self.start <= end and (self.end is None or self.end >= start)


@dataclass
class _Cluster:
    """N nodes on loopback naming each other as peers; restarted in place (same home and port)."""

    n: int
    models_dir: Path
    home: Path
    ports: list[int] = field(default_factory=list)
    nodes: list[LocalNode] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)  # every node process ever started
    windows: list[_Window] = field(default_factory=list)
    orphans: list[int] = field(default_factory=list)  # runners that outlived their node (killed when found)
    # A restart runs in a thread that a Ctrl-C does not stop: once `stop` began, it starts no node.
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: bool = False

    def start(self) -> None:
        self.ports = free_ports(self.n)
        for i in range(self.n):
            self._launch(i)
        wait_for(self.agreed, 60, f"{self.n} nodes to agree on a master")

    def _launch(self, i: int) -> None:
        peers = static_peers(i, self.ports) if self.n > 1 else ["--no-discovery"]
        with self._lock:
            if self._stopping:
                raise RuntimeError("the soak is stopping")
            node = start_node(self.home / f"node{i}", self.models_dir, "--no-preload", *peers, port=self.ports[i])
            if i < len(self.nodes):
                self.nodes[i] = node
            else:
                self.nodes.append(node)
            self.pids.append(node.process.pid)

    def agreed(self) -> bool:
        """Every node answers and sees the same master and all N nodes."""
        if exited := [node for node in self.nodes if node.process.poll() is not None]:
            raise RuntimeError(f"node on {exited[0].port} exited {exited[0].process.returncode}")
        try:
            states = [node.state() for node in self.nodes]
        except (httpx.HTTPError, ValueError):
            return False
        views = {(s["masterId"], s["term"], tuple(sorted(s["nodes"]))) for s in states}
        return len(views) == 1 and states[0]["masterId"] is not None and len(states[0]["nodes"]) == self.n

    def restart(self, i: int, kill: bool) -> list[str]:
        """Stop node i (SIGTERM, or SIGKILL), check it and its runners went, start it again with the
        same home and port and wait until the cluster agrees on it; what went wrong."""
        node = self.nodes[i]
        window = _Window(i, time.monotonic(), kill)
        self.windows.append(window)
        try:
            node.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            problems = _wait_exit(node, expected=-signal.SIGKILL if kill else 0)
            if orphans := _reap_runners([node.process.pid]):
                self.orphans += orphans
                problems.append(f"runners {orphans} outlived node {i}")
            self._launch(i)
            try:
                wait_for(self.agreed, REJOIN_TIMEOUT, f"node {i} to rejoin")
            except (TimeoutError, RuntimeError) as e:
                problems.append(f"after its restart: {e}")
            return problems
        finally:
            window.end = time.monotonic()

    def stop(self) -> tuple[list[int], list[str]]:
        """SIGTERM every node at once and wait; their exit codes, and what went wrong."""
        with self._lock:
            self._stopping = True
        for node in self.nodes:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        problems = [problem for node in self.nodes for problem in _wait_exit(node, expected=0)]
        return [node.process.returncode for node in self.nodes], problems

    def scan_logs(self, stopped_at: str) -> tuple[Counter[str], list[str]]:
        """Lines with a bug marker, counted; the first line of each kind of error, marked when it was
        logged during the final stop (`stopped_at`, in the logs' own timestamp format)."""
        markers: Counter[str] = Counter()
        seen: dict[str, str] = {}
        for i, node in enumerate(self.nodes):
            if not node.log.exists():
                continue
            for line in node.log.read_text(errors="replace").splitlines():
                found = [m for m in LOG_MARKERS if m in line]
                markers.update(found)
                if found or " ERROR " in line or " CRITICAL " in line:
                    key = found[0] if found else message_prefix(line.split(": ", 1)[-1])
                    late = line[:1].isdigit() and line[:len(stopped_at)] >= stopped_at
                    when = " (during the final stop)" if late else ""
                    seen.setdefault(key, f"node{i}{when}: {line[:300]}")
        return markers, list(seen.values())


def _wait_exit(node: LocalNode, expected: int) -> list[str]:
    try:
        code = node.process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        node.process.kill()
        node.process.wait()
        return [f"node on {node.port} did not stop within {STOP_TIMEOUT:.0f}s and was killed"]
    return [] if code == expected else [f"node on {node.port} exited {code}, not {expected}"]


def _reap_runners(node_pids: list[int]) -> list[int]:
    """Runners of these exited nodes, which should be gone within seconds: those left, killed."""
    def left() -> list[int]:
        return [p for pid in node_pids for p in runner_pids(pid)]

    with suppress(TimeoutError):
        wait_for(lambda: not left(), RUNNER_EXIT_TIMEOUT, "runners to exit")
    orphans = left()
    for pid in orphans:
        with suppress(psutil.Error):
            psutil.Process(pid).kill()
    return orphans


# -- the load ------------------------------------------------------------------------------------


@dataclass
class _Load:
    """Client workers, node restarts and memory samples, all for the set time."""

    cluster: _Cluster
    options: argparse.Namespace
    seed: int
    results: list[Result] = field(default_factory=list)
    peaks: dict[int, tuple[float, float, float]] = field(default_factory=dict)  # total, node, runners (bytes)
    problems: list[str] = field(default_factory=list)
    restarts: int = 0
    kills: int = 0
    _end: float = 0.0

    async def run(self) -> float:
        """Run the load; how long it took, the requests in flight at its end included."""
        options = self.options
        start = time.monotonic()
        self._end = start + options.duration
        timeout = httpx.Timeout(options.request_timeout, connect=5)
        limits = httpx.Limits(max_keepalive_connections=0)  # a fresh connection per request, as many clients do
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._sample)
                tg.start_soon(self._restarter)
                async with anyio.create_task_group() as workers:
                    for w in range(options.concurrency):
                        workers.start_soon(self._worker, client, random.Random(self.seed * 1000 + w))
                tg.cancel_scope.cancel()  # the sampler; the restarter is done, as its last restart began in time
        return time.monotonic() - start

    async def _restarter(self) -> None:
        every = self.options.restart_every
        if not every:
            return
        rng = random.Random(self.seed)
        k = 1
        while (at := self._end - self.options.duration + k * every) < self._end:
            await anyio.sleep(at - time.monotonic())
            kill = rng.random() < self.options.kill_fraction
            i = (k - 1) % self.cluster.n
            log.info("soak: node=%d port=%d %s", i, self.cluster.ports[i], "SIGKILL" if kill else "SIGTERM")
            with anyio.CancelScope(shield=True):  # a restart once begun is finished, so no node is left down
                self.problems += await anyio.to_thread.run_sync(self.cluster.restart, i, kill)
            log.info("soak: node=%d back in the cluster after %.1fs", i, self.cluster.windows[-1].seconds)
            self.restarts += 1
            self.kills += kill
            k += 1

    async def _sample(self) -> None:
        while True:
            for i, (total, node, runners) in (await anyio.to_thread.run_sync(self._rss)).items():
                if total > self.peaks.get(i, (0.0, 0.0, 0.0))[0]:
                    self.peaks[i] = (total, node, runners)
            await anyio.sleep(SAMPLE_PERIOD)

    def _rss(self) -> dict[int, tuple[float, float, float]]:
        sizes = {}
        for i, node in enumerate(list(self.cluster.nodes)):
            with suppress(psutil.Error):
                process = psutil.Process(node.process.pid)
                own = process.memory_info().rss
                runners = 0
                for child in process.children():
                    with suppress(psutil.Error):
                        runners += child.memory_info().rss
                sizes[i] = (float(own + runners), float(own), float(runners))
        return sizes

    async def _worker(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        while time.monotonic() < self._end:
            result = await self._request(client, rng)
            self.results.append(result)
            if result.outcome in (Outcome.FAILED, Outcome.LOST):
                await anyio.sleep(FAILURE_PAUSE)

    async def _request(self, client: httpx.AsyncClient, rng: random.Random) -> Result:
        options = self.options
        i = rng.randrange(self.cluster.n)
        stream = rng.random() < 0.5
        cancel = rng.random() < options.cancel_fraction
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(1, options.max_prompt_tokens)))
        body: dict[str, Any] = {
            "model": options.model, "stream": stream, "temperature": rng.choice([0.0, 0.7]),
            "max_tokens": rng.randint(1, options.max_tokens), "messages": [{"role": "user", "content": prompt}]}
        if stream:
            body["stream_options"] = {"include_usage": True}
        url = f"http://127.0.0.1:{self.cluster.ports[i]}/v1/chat/completions"
        start = time.monotonic()
        try:
            with anyio.fail_after(options.request_timeout):
                if stream:  # cancelled after a few chunks, or a moment
                    outcome, reason, tokens = await _stream(client, url, body, rng.randint(1, 4) if cancel else None)
                else:
                    delay = rng.uniform(0.05, 1.0) if cancel else None
                    outcome, reason, tokens = await _complete(client, url, body, delay)
        except TimeoutError:
            outcome, reason, tokens = Outcome.LOST, f"no answer within {options.request_timeout:.0f}s", 0
        except httpx.ConnectError:
            outcome, reason, tokens = Outcome.LOST, "connection refused outside a restart", 0
            if self._restarting(i, start, time.monotonic()):
                outcome, reason = Outcome.FAILED, "connection refused: node restarting"
        except httpx.HTTPError as e:
            outcome, reason, tokens = Outcome.LOST, f"{type(e).__name__}: {message_prefix(str(e))}", 0
        end = time.monotonic()
        cut = reason is not None and reason.startswith(("stream cut", "RemoteProtocolError", "ReadError"))
        if outcome == Outcome.LOST and cut and self._killed(i, start, end):
            outcome, reason = Outcome.FAILED, f"{reason} (its node was SIGKILLed)"
        return Result(outcome, reason, end - start, tokens)

    def _restarting(self, i: int, start: float, end: float) -> bool:
        return any(w.node == i and w.overlaps(start, end) for w in self.cluster.windows)

    def _killed(self, i: int, start: float, end: float) -> bool:
        return any(w.node == i and w.kill and w.overlaps(start, end) for w in self.cluster.windows)


async def _complete(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                    cancel_after: float | None) -> tuple[Outcome, str | None, int]:
    with anyio.move_on_after(cancel_after if cancel_after is not None else float("inf")) as scope:
        response = await client.post(url, json=body)
    if scope.cancelled_caught:
        return Outcome.CANCELLED, None, 0
    if response.status_code == 200:
        return completion_result(response.text)
    if reason := error_reason(response.status_code, response.text):
        return Outcome.FAILED, reason, 0
    return Outcome.LOST, f"{response.status_code} without an error body", 0


async def _stream(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                  cancel_after: int | None) -> tuple[Outcome, str | None, int]:
    tally = StreamTally()
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            if reason := error_reason(response.status_code, text):
                return Outcome.FAILED, reason, 0
            return Outcome.LOST, f"{response.status_code} without an error body", 0
        try:
            async for line in response.aiter_lines():
                tally.feed(line)
                if cancel_after is not None and tally.chunks >= cancel_after and not tally.done:
                    return Outcome.CANCELLED, None, 0  # leaving the block closes the connection
        except httpx.HTTPError as e:
            tally.cut = type(e).__name__  # judged by what came before the cut
    outcome, reason = tally.verdict()
    return outcome, reason, tally.tokens


# -- the command ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=2, help="nodes on this host (default: 2)")
    parser.add_argument("--duration", type=float, default=120, metavar="SECONDS", help="load time (default: 120)")
    parser.add_argument("--concurrency", type=int, default=3, help="client workers (default: 3)")
    parser.add_argument("--restart-every", type=float, default=30, metavar="SECONDS",
                        help="restart a node this often, alternating nodes; 0: never (default: 30)")
    parser.add_argument("--kill-fraction", type=float, default=0.0,
                        help="share of restarts done with SIGKILL instead of SIGTERM (default: 0)")
    parser.add_argument("--cancel-fraction", type=float, default=0.1,
                        help="share of requests the client closes early (default: 0.1)")
    parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens is drawn from 1..this")
    parser.add_argument("--max-prompt-tokens", type=int, default=128,
                        help="the prompt's length in words (about a token each) is drawn from 1..this")
    parser.add_argument("--request-timeout", type=float, default=150, metavar="SECONDS",
                        help="a request unanswered this long is lost (default: 150, above the node's 120 s wait "
                             "for a model to load)")
    parser.add_argument("--seed", type=int, help="seed of the random draws (default: a random one, reported)")
    parser.add_argument("--split", action="store_true",
                        help="place the model across all nodes, not where the planner chooses")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(CARDS), help="model id")
    parser.add_argument("--keep-logs", action="store_true", help="keep the nodes' homes and logs even when all is well")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace, models_dir: Path) -> int:
    if args.nodes < 1 or args.duration <= 0 or args.concurrency < 1 or args.restart_every < 0 \
            or args.max_tokens < 1 or args.max_prompt_tokens < 1 or not 0 <= args.kill_fraction <= 1 \
            or not 0 <= args.cancel_fraction <= 1:
        print("exo soak: needs --nodes, --concurrency, --max-tokens, --max-prompt-tokens >= 1, --duration > 0, "
              "--restart-every >= 0 and fractions in [0, 1]", file=sys.stderr)
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    ModelStore(models_dir).ensure(CARDS[args.model])  # once here, not by N nodes at once
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    try:
        report = soak(args, models_dir, seed)
    except (RuntimeError, TimeoutError, httpx.HTTPError) as e:
        print(f"exo soak: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("exo soak: interrupted; every node was stopped", file=sys.stderr)
        return 130
    print(json.dumps(report.model_dump(by_alias=False), indent=2) if args.json else table(report))
    return 0 if report.ok else 1


def soak(args: argparse.Namespace, models_dir: Path, seed: int) -> SoakReport:
    home = Path(tempfile.mkdtemp(prefix="exo-soak-"))
    cluster = _Cluster(args.nodes, models_dir, home)
    load = _Load(cluster, args, seed)
    try:
        cluster.start()
        _place(cluster, args.model, args.split)
        elapsed = anyio.run(load.run)
    except BaseException:
        print(f"exo soak: the nodes' logs are kept in {home}", file=sys.stderr)
        raise
    finally:
        with _sigint_ignored():  # the nodes are stopped whatever the keyboard says
            stopped_at = time.strftime("%Y-%m-%d %H:%M:%S")  # as logging's asctime starts
            codes, problems = cluster.stop()
            if orphans := _reap_runners(cluster.pids):
                cluster.orphans += orphans
                problems.append(f"runners {orphans} outlived their nodes")
            markers, errors = cluster.scan_logs(stopped_at)
            for problem in problems:
                print(f"exo soak: {problem}", file=sys.stderr)
    counts = Counter(r.outcome for r in load.results)
    served = [r for r in load.results if r.outcome == Outcome.SERVED]
    latencies = sorted(r.latency_s for r in served)
    tokens = sum(r.tokens for r in served)
    problems = load.problems + problems + [f"{count} log line(s) with {marker}" for marker, count in markers.items()]
    report = SoakReport(
        nodes=args.nodes, model=args.model, seed=seed, split=args.split, concurrency=args.concurrency,
        duration_s=elapsed, restart_every_s=args.restart_every, kill_fraction=args.kill_fraction,
        cancel_fraction=args.cancel_fraction, max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
        requests=len(load.results),
        served=counts[Outcome.SERVED], failed=counts[Outcome.FAILED], cancelled=counts[Outcome.CANCELLED],
        lost=counts[Outcome.LOST],
        failure_reasons=_histogram(r for r in load.results if r.outcome == Outcome.FAILED),
        lost_reasons=_histogram(r for r in load.results if r.outcome == Outcome.LOST),
        latency_p50_s=statistics.median(latencies) if latencies else None,
        latency_p95_s=latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else None,
        completion_tokens=tokens, tokens_per_s=tokens / elapsed,
        memory=[NodeMemory(node=i, port=cluster.ports[i], peak_mb=total / 1e6, peak_node_mb=node / 1e6,
                           peak_runners_mb=runners / 1e6) for i, (total, node, runners) in sorted(load.peaks.items())],
        restarts=load.restarts, kills=load.kills, restart_s=[round(w.seconds, 1) for w in cluster.windows],
        orphans=cluster.orphans, exit_codes=codes,
        log_markers=dict(markers), log_errors=errors, problems=problems,
        ok=not counts[Outcome.LOST] and not cluster.orphans and not problems)
    if args.keep_logs or not report.ok:
        print(f"exo soak: the nodes' logs are kept in {home}", file=sys.stderr)
    else:
        shutil.rmtree(home, ignore_errors=True)
    return report


def _place(cluster: _Cluster, model_id: str, split: bool) -> None:
    """The model across all nodes in even layer ranges, or where the planner puts it; wait until ready."""
    nodes = cluster.nodes
    if split:
        n_layers = CARDS[model_id].n_layers
        layers = [(i * n_layers // len(nodes), (i + 1) * n_layers // len(nodes)) for i in range(len(nodes))]
        place(nodes, nodes, model_id, layers, READY_TIMEOUT)
        return
    answer = httpx.post(f"{nodes[-1].url}/place_instance", json={"model_id": model_id}, timeout=15)
    if answer.status_code != 200:
        raise RuntimeError(f"POST /place_instance answered {answer.status_code}: {answer.text[:500]}")
    ids = list(untag(answer.json())["shardAssignments"]["runnerToShard"])

    def ready() -> bool:
        return all(all(node.state()["runners"].get(rid, {}).get("status") == RunnerStatus.READY for rid in ids)
                   for node in nodes)

    wait_for(ready, READY_TIMEOUT, f"the runners of {model_id} to be Ready")


def _histogram(results: Iterable[Result]) -> dict[str, int]:
    return dict(Counter(r.reason or "?" for r in results).most_common())


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def table(r: SoakReport) -> str:
    def pct(n: int) -> str:
        return f"{n} ({n / r.requests:.0%})" if r.requests else str(n)

    p50 = f"{r.latency_p50_s:.2f}s" if r.latency_p50_s is not None else "-"
    p95 = f"{r.latency_p95_s:.2f}s" if r.latency_p95_s is not None else "-"
    lines = [f"exo soak: {r.nodes} nodes, {r.model}, {'split' if r.split else 'placed by the planner'}, "
             f"{r.concurrency} clients, {r.duration_s:.0f}s, seed {r.seed}",
             f"requests  {r.requests}: served {pct(r.served)}, failed {pct(r.failed)}, "
             f"cancelled {pct(r.cancelled)}, lost {pct(r.lost)}",
             f"served    p50 {p50}, p95 {p95}, {r.completion_tokens} tokens, {r.tokens_per_s:.1f} tok/s overall",
             f"restarts  {r.restarts} ({r.kills} by SIGKILL), back after {r.restart_s} s",
             f"stop      exit codes {r.exit_codes}; orphaned runners {r.orphans or 'none'}"]
    lines += [f"memory    node{m.node}: peak {m.peak_mb:.0f} MB (node {m.peak_node_mb:.0f} + runners "
              f"{m.peak_runners_mb:.0f})" for m in r.memory]
    for title, reasons in (("failed", r.failure_reasons), ("lost", r.lost_reasons)):
        lines += [f"{title:9} {count:5}  {reason}" for reason, count in reasons.items()]
    lines += [f"log       {line}" for line in r.log_errors]
    lines += [f"PROBLEM   {problem}" for problem in r.problems]
    lines.append("verdict   " + ("ok" if r.ok else "FAILED"))
    return "\n".join(lines)
