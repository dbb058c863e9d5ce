"""`exo bench-cluster`: what splitting one model over N real nodes costs, measured through the API.

For each node count it starts that many `exo` node processes on loopback, places the model on
exactly those nodes with even layer ranges (rank i on node i) and streams chats at temperature 0 to
the node of rank 0, so a request crosses only the ring. Rank 0 does not expose its compute/wait
split, so the cost of a hop is derived from the client's side: a token crosses the N links of an
N-rank ring, so it is (1 / decode rate at N - 1 / decode rate at 1 node) / N. Two chats that share
a long system prompt (about 600 tokens) and ask different questions measure what the prefix cache
saves: the second one's time to first token against the first's. Every node is stopped with SIGTERM
and checked to have exited with its runners, even on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from exo.local_cluster import LocalNode, place, start_node, static_peers, wait_for
from exo.models.cards import CARDS, DEFAULT_MODEL
from exo.models.store import ModelStore
from exo.shared.types import FrozenModel
from exo.worker.profile import free_ports
from exo.worker.runner.process import runner_pids

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
# A system prompt as long as an assistant's instructions often are (about 600 tokens), and two
# questions that follow it.
SYSTEM = " ".join(f"Rule {i}: when a visitor asks about the {topic}, answer in one sentence and point to "
                  f"desk {i % 7 + 1}." for i, topic in enumerate(["museum hours", "ticket prices", "guided tours",
                                                                  "the cafe", "lost property", "parking",
                                                                  "school visits", "the library"] * 3))
QUESTIONS = ("Where can I park my car?", "Is there a guided tour in the afternoon?")
READY_TIMEOUT = 240.0  # N runners loading and warming up on a small machine
STOP_TIMEOUT = 30.0


class Stream(FrozenModel):
    """One streamed chat as the client saw it."""

    ttft_s: float  # request sent to the first chunk with content
    decode_s: float  # first chunk with content to the last one
    prompt_tokens: int
    completion_tokens: int
    text: str
    cached_tokens: int = 0  # of the prompt, held by the prefix cache

    @property
    def decode_tps(self) -> float:
        return (self.completion_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0


class ClusterMeasurement(FrozenModel):
    """Medians over the timed single-stream runs on one node count, and one concurrent round."""

    nodes: int
    pinned: bool  # node i on core i alone, as if each were a machine of one core
    layers: list[tuple[int, int]]
    runs: int
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    decode_tps: float
    concurrent: int
    aggregate_tps: float  # all completion tokens of the concurrent round over its wall time
    text: str
    consistent: bool  # every request at this node count gave the same text
    shared_prompt_tokens: int  # of each of the two chats that share SYSTEM
    shared_ttft_s: tuple[float, float]  # their times to first token, the first chat's and the second's
    shared_cached_tokens: int  # of the second chat's prompt, held by the prefix cache

    @property
    def shared_ttft_ratio(self) -> float:
        """The second chat's time to first token as a fraction of the first's."""
        return self.shared_ttft_s[1] / self.shared_ttft_s[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=_node_counts, default=[1, 2, 4], metavar="N,N,...",
                        help="node counts to measure, each with fresh nodes (default: 1,2,4)")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(CARDS), help="model id")
    parser.add_argument("--runs", type=int, default=3, help="timed requests, after one untimed warm-up")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    parser.add_argument("--concurrent", type=int, default=4, help="requests at once for the aggregate rate")
    parser.add_argument("--pin", action="store_true",
                        help="pin node i to CPU core i (taskset), modelling machines of one core each; "
                             "needs a core per node")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def _node_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of node counts such as 1,2,4")
    return counts


def run(args: argparse.Namespace, models_dir: Path) -> int:
    if args.runs < 1 or args.max_tokens < 2 or args.concurrent < 1:
        print("exo bench-cluster: needs --runs >= 1, --max-tokens >= 2 and --concurrent >= 1", file=sys.stderr)
        return 2
    if args.pin and max(args.nodes) > len(_cores()):
        print(f"exo bench-cluster: --pin needs a core per node; {len(_cores())} cores for {max(args.nodes)} nodes",
              file=sys.stderr)
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    card = CARDS[args.model]
    ModelStore(models_dir).ensure(card)  # once here, not by N nodes at once
    results = []
    for n in args.nodes:
        try:
            results.append(measure(n, card.id, card.n_layers, models_dir, args.runs, args.max_tokens,
                                   args.concurrent, pin=args.pin))
        except (RuntimeError, TimeoutError, httpx.HTTPError) as e:
            print(f"exo bench-cluster: {n} node(s): {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("exo bench-cluster: interrupted; every node was stopped", file=sys.stderr)
            return 130
    if args.json:
        print(json.dumps({"results": [r.model_dump(exclude={"text"}, by_alias=False) for r in results],
                          "vs_one_node": compare(results)}, indent=2))
    else:
        print(table(results))
    return 0


def measure(n: int, model_id: str, n_layers: int, models_dir: Path, runs: int, max_tokens: int,
            concurrent: int, *, pin: bool = False) -> ClusterMeasurement:
    with cluster(n, models_dir, pin=pin) as nodes:
        layers = [(i * n_layers // n, (i + 1) * n_layers // n) for i in range(n)]
        instance_id = place(nodes, nodes, model_id, layers, READY_TIMEOUT)
        ask = _Chat(nodes[0].url, model_id, max_tokens)
        ask()  # warm-up: the first chat after loading is slower
        streams = [ask() for _ in range(runs)]
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrent) as pool:
            together = list(pool.map(lambda _: ask(), range(concurrent)))
        wall = time.perf_counter() - start
        shared = [_Chat(nodes[0].url, model_id, 2, [{"role": "system", "content": SYSTEM},
                                                      {"role": "user", "content": q}])() for q in QUESTIONS]
        remove(nodes, instance_id)
    last = streams[-1]
    return ClusterMeasurement(
        nodes=n, pinned=pin, layers=layers, runs=runs, prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        ttft_s=statistics.median(s.ttft_s for s in streams),
        decode_tps=statistics.median(s.decode_tps for s in streams), concurrent=concurrent,
        aggregate_tps=sum(s.completion_tokens for s in together) / wall, text=last.text,
        consistent=len({s.text for s in streams + together}) == 1, shared_prompt_tokens=shared[1].prompt_tokens,
        shared_ttft_s=(shared[0].ttft_s, shared[1].ttft_s), shared_cached_tokens=shared[1].cached_tokens)


def compare(results: list[ClusterMeasurement]) -> dict[int, dict[str, float | bool]]:
    """Each node count against one node: decode rate as a fraction, TTFT as a factor, the cost of a hop."""
    one = next((r for r in results if r.nodes == 1), None)
    if one is None:
        return {}
    return {r.nodes: {"decode": r.decode_tps / one.decode_tps, "ttft": r.ttft_s / one.ttft_s,
                      "hop_ms": (1 / r.decode_tps - 1 / one.decode_tps) / r.nodes * 1e3,
                      "same_text": r.text == one.text}
            for r in results if r.nodes > 1}


def table(results: list[ClusterMeasurement]) -> str:
    rows = [("nodes", "layers", "TTFT ms", "decode tok/s", f"{results[0].concurrent} at once tok/s", "tokens",
             "same text")]
    one = next((r for r in results if r.nodes == 1), None)
    for r in results:
        same = "-" if one is None or r is one else "yes" if r.text == one.text else "NO"
        rows.append((str(r.nodes), "/".join(str(end - start) for start, end in r.layers), f"{r.ttft_s * 1e3:.0f}",
                     f"{r.decode_tps:.1f}", f"{r.aggregate_tps:.1f}", str(r.completion_tokens), same))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip() for row in rows]
    first = results[0]
    lines.append(f"{first.prompt_tokens} prompt tokens, {first.completion_tokens} generated at temperature 0, "
                 f"median of {first.runs} streamed runs after a warm-up, sent to rank 0's node; "
                 f"{first.concurrent} at once: all their tokens over the wall time")
    for n, c in compare(results).items():
        lines.append(f"{n} nodes vs 1: decode {c['decode']:.0%}, TTFT {c['ttft']:.2f}x, "
                     f"{c['hop_ms']:.1f} ms per token per hop ({n} hops a token)")
    for r in results:
        first, second = r.shared_ttft_s
        lines.append(f"{r.nodes} node(s), two chats sharing a system prompt ({r.shared_prompt_tokens} prompt tokens "
                     f"each): TTFT {first * 1e3:.0f} ms, then {second * 1e3:.0f} ms ({r.shared_ttft_ratio:.2f}x; "
                     f"{r.shared_cached_tokens} tokens from the prefix cache)")
    if any(not r.consistent for r in results):
        lines.append("WARNING: greedy requests gave different texts within one node count")
    if any(r.pinned for r in results):
        lines.append("each node pinned to a core of its own, as if each were a machine of one core")
    cores = len(_cores())
    if crowded := [str(r.nodes) for r in results if r.nodes > cores]:
        lines.append(f"{' and '.join(crowded)} nodes on {cores} cores: those rows measure CPU contention, "
                     "not the cost of a hop")
    return "\n".join(lines)


def _cores() -> list[int]:
    """The CPU cores this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


@dataclass
class _Chat:
    url: str
    model_id: str
    max_tokens: int
    messages: list[dict[str, str]] | None = None  # None: PROMPT, from the user

    def __call__(self) -> Stream:
        messages = self.messages or [{"role": "user", "content": PROMPT}]
        body = {"model": self.model_id, "messages": messages, "temperature": 0,
                "max_tokens": self.max_tokens, "stream": True, "stream_options": {"include_usage": True}}
        text, first, last, usage = [], 0.0, 0.0, None
        start = time.perf_counter()
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=120) as response:
            if response.status_code != 200:
                raise RuntimeError(f"chat answered {response.status_code}: {response.read().decode()[:500]}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"chat failed mid-stream: {chunk['error']}")
                content = "".join(c["delta"].get("content") or "" for c in chunk.get("choices", []))
                if content:
                    last = time.perf_counter()
                    first = first or last
                    text.append(content)
                usage = chunk.get("usage") or usage
        if usage is None or not first:
            raise RuntimeError("the stream ended without content or usage")
        return Stream(ttft_s=first - start, decode_s=last - first, prompt_tokens=usage["prompt_tokens"],
                      completion_tokens=usage["completion_tokens"], text="".join(text),
                      cached_tokens=usage.get("prompt_tokens_details", {}).get("cached_tokens", 0))


# -- nodes ------------------------------------------------------------------------------------


@contextmanager
def cluster(n: int, models_dir: Path, *, pin: bool = False) -> Iterator[list[LocalNode]]:
    """N nodes on loopback naming each other as peers, agreed on a master; stopped and removed after.
    Each runs in its own session, so a Ctrl-C reaches only this process, which then stops them.
    Pinned, node i and its runners run on core i only (the kernels then size their pool to it)."""
    tmp = Path(tempfile.mkdtemp(prefix="exo-bench-cluster-"))
    ports = free_ports(n)
    nodes: list[LocalNode] = []
    failed = False
    try:
        for i, port in enumerate(ports):
            peers = static_peers(i, ports) if n > 1 else ["--no-discovery"]
            prefix = ["taskset", "-c", str(_cores()[i])] if pin else []
            nodes.append(start_node(tmp / f"node{i}", models_dir, "--no-preload", *peers, port=port, prefix=prefix))
        wait_for(lambda: _agreed(nodes), 60, f"{n} nodes to agree on a master")
        yield nodes
    except Exception:
        failed = True
        raise
    finally:
        with _sigint_deferred():
            problems = _stop_all(nodes)
            shown = problems if failed else []  # otherwise they are raised below
            for line in [*shown, *(f"in a node log: {line}" for line in _log_errors(nodes))]:
                print(f"exo bench-cluster: {line}", file=sys.stderr)
            if problems or failed:
                for node in nodes:
                    print(f"--- node on {node.port}, last lines of its log:\n{node.log_tail()}", file=sys.stderr)
            shutil.rmtree(tmp, ignore_errors=True)
    if problems:
        raise RuntimeError("; ".join(problems))


def _stop_all(nodes: list[LocalNode]) -> list[str]:
    """SIGTERM every node, then check that each exited 0 and left no runner; what went wrong, if anything."""
    for node in nodes:
        if node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
    problems = []
    for node in nodes:
        try:
            code = node.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            node.process.kill()
            code = node.process.wait()
            problems.append(f"node on {node.port} ignored SIGTERM for {STOP_TIMEOUT:.0f}s and was killed")
        if code != 0:
            problems.append(f"node on {node.port} exited {code}")
        deadline = time.monotonic() + 5  # a runner exits when its node's pipe closes
        while (left := runner_pids(node.process.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if left:
            for pid in left:
                with suppress(psutil.Error):
                    psutil.Process(pid).kill()
            problems.append(f"node on {node.port} left runners {left} behind; killed them")
    return problems


def _log_errors(nodes: list[LocalNode]) -> list[str]:
    lines = []
    for node in nodes:
        log = node.home / "node.log"
        if log.exists():
            lines += [f"[{node.port}] {line}" for line in log.read_text(errors="replace").splitlines()
                      if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")]
    return lines


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C back while the nodes are being stopped, and raise it after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _agreed(nodes: list[LocalNode]) -> bool:
    for node in nodes:
        if node.process.poll() is not None:
            raise RuntimeError(f"node on {node.port} exited {node.process.returncode} while starting")
    try:
        states = [node.state() for node in nodes]
    except (httpx.HTTPError, ValueError):
        return False
    views = {(s["masterId"], s["term"], tuple(sorted(s["nodes"]))) for s in states}
    return len(views) == 1 and states[0]["masterId"] is not None and len(states[0]["nodes"]) == len(nodes)


def remove(nodes: list[LocalNode], instance_id: str) -> None:
    """Delete the instance and wait for its runners to exit, as an operator would, before the nodes stop."""
    answer = httpx.delete(f"{nodes[0].url}/instance/{instance_id}", timeout=15)
    if answer.status_code != 200:
        raise RuntimeError(f"DELETE /instance answered {answer.status_code}: {answer.text[:500]}")
    wait_for(lambda: not any(runner_pids(node.process.pid) for node in nodes), 30, "the runners to stop")
