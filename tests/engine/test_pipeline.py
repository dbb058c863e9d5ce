"""A model split across real processes joined in a ring on loopback generates what the whole model does."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
from nodes import free_ports
from pipeline_rank import RING_LOST
from test_directory_model import hf_weights, write_model

from exo.engine.generate import PREFILL_CHUNK, GenerationParams, generate_step
from exo.engine.loading import LoadedModel, load
from exo.engine.pipeline import write_hostfile
from exo.engine.sample import sampler_for

pytestmark = pytest.mark.slow

RANK_SCRIPT = Path(__file__).parents[1] / "pipeline_rank.py"
RANGES = {"2-ranks": [(0, 15), (15, 30)], "3-ranks": [(0, 10), (10, 20), (20, 30)]}
TIMEOUT = 60.0

# Prompts longer than PREFILL_CHUNK go to a tiny model instead: with the BLAS bundled in MLX's wheel,
# which the test process has, the real model takes about 40 s over one 512-token chunk.
CASES = {
    "france-greedy": ("What is the capital of France?", {"max_tokens": 24}),
    "seeded-sampling": ("Tell me a story.", {"max_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 7}),
    "penalized": ("List fruits, one a line.", {"max_tokens": 16, "temperature": 0.7, "min_p": 0.05, "seed": 3,
                                               "presence_penalty": 0.4, "frequency_penalty": 0.8}),
}


@dataclass
class RunningRing:
    processes: list[subprocess.Popen[str]]

    @property
    def head(self) -> subprocess.Popen[str]:
        return self.processes[0]

    @property
    def followers(self) -> list[subprocess.Popen[str]]:
        return self.processes[1:]

    def generate(self, prompt: list[int], **params: Any) -> list[int]:
        return self.answer(prompt, **params)["tokens"]

    def answer(self, prompt: list[int], **params: Any) -> dict[str, Any]:
        """The head's answer: the tokens, the prompt positions it took from the prefix cache, its timings."""
        assert self.head.stdin is not None
        self.head.stdin.write(json.dumps({"prompt": prompt, **params}) + "\n")
        self.head.stdin.flush()
        answer: dict[str, Any] = json.loads(read_line(self.head))
        return answer


def read_line(process: subprocess.Popen[str], timeout: float = TIMEOUT) -> str:
    """The process's next line of output; the ranks write one line and then wait, so none is left buffered."""
    assert process.stdout is not None
    if not select.select([process.stdout], [], [], timeout)[0]:
        raise TimeoutError(f"rank process {process.pid} said nothing for {timeout}s")
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"rank process {process.pid} exited with {process.wait()}")
    return line


@contextmanager
def running_ring(model_path: Path, ranges: list[tuple[int, int]], logs: Path,
                 prefix_positions: int = 0) -> Iterator[RunningRing]:
    """One process per range, joined in a ring on loopback (the head with a prefix cache of
    `prefix_positions`, if any); whatever still runs at the end is killed."""
    hostfile = logs / "hosts.json"
    write_hostfile(hostfile, [f"127.0.0.1:{port}" for port in free_ports(len(ranges))])
    processes: list[subprocess.Popen[str]] = []
    try:
        for rank, (start, end) in enumerate(ranges):
            with (logs / f"rank{rank}.log").open("w") as err:
                processes.append(subprocess.Popen(
                    [sys.executable, str(RANK_SCRIPT), str(hostfile), str(rank), str(start), str(end),
                     str(model_path), str(prefix_positions)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True))
        for process in processes:
            assert read_line(process) == "ready\n"
        yield RunningRing(processes)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()


def stop(ring: RunningRing) -> None:
    """Stop the followers between requests, last rank first, then the head: every rank leaves cleanly.

    A follower only reads from its left, so one whose left neighbour leaves first sees the ring lost.
    """
    for follower in reversed(ring.followers):
        follower.send_signal(signal.SIGTERM)
        assert follower.wait(timeout=10) == 0
    assert ring.head.stdin is not None
    ring.head.stdin.close()
    assert ring.head.wait(timeout=10) == 0


@pytest.fixture(scope="module", params=list(RANGES))
def ring(request: pytest.FixtureRequest, model_path: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRing]:
    # A prefix cache of two entries (256 positions each): requests reuse, and evict, as they go.
    with running_ring(model_path, RANGES[request.param], tmp_path_factory.mktemp(request.param),
                      prefix_positions=512) as ring:
        yield ring
        stop(ring)


def chat(smollm: LoadedModel, content: str) -> list[int]:
    return smollm.tokenizer.encode(smollm.tokenizer.apply_chat_template([{"role": "user", "content": content}]))


def whole_model_tokens(smollm: LoadedModel, prompt: list[int], params: GenerationParams) -> list[int]:
    """What generate_step on the whole model answers, up to and including an end token."""
    sampler = sampler_for(params)
    steps = generate_step(prompt, smollm.model, smollm.model.make_cache(), sampler=sampler)
    tokens = []
    for token in islice(steps, params.max_tokens):
        tokens.append(token)
        if token in smollm.tokenizer.eos_ids:
            break
    steps.close()
    return tokens


@pytest.fixture(scope="module")
def cases(smollm: LoadedModel) -> dict[str, tuple[list[int], dict[str, Any], list[int]]]:
    """Per case: the prompt's token ids, the request's parameters, and the whole model's answer."""
    out = {}
    for name, (content, params) in CASES.items():
        prompt = chat(smollm, content)
        out[name] = (prompt, params, whole_model_tokens(smollm, prompt, GenerationParams(**params)))
    return out


def test_ring_generates_the_same_tokens_as_the_whole_model_request_after_request(
        ring: RunningRing, cases: dict[str, tuple[list[int], dict[str, Any], list[int]]]) -> None:
    for name, (prompt, params, expected) in cases.items():
        assert ring.generate(prompt, **params) == expected, name


def test_request_closed_after_two_tokens_leaves_the_ring_ready_for_the_next(
        ring: RunningRing, cases: dict[str, tuple[list[int], dict[str, Any], list[int]]]) -> None:
    prompt, params, expected = cases["france-greedy"]
    assert ring.generate(prompt, max_tokens=2) == expected[:2]
    assert ring.generate(prompt, **params) == expected


def test_a_shared_system_prompt_is_reused_on_every_rank_and_entries_are_dropped_in_step(
        ring: RunningRing, smollm: LoadedModel) -> None:
    system = "You answer questions about the solar system in one short sentence, for children. " * 3
    questions = ["How many planets are there?", "Which planet is the largest?", "What is the Moon made of?",
                 "How many planets are there?"]  # the third evicts an entry; the fourth finds one still held
    for i, question in enumerate(questions):
        prompt = smollm.tokenizer.encode(smollm.tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": question}]))
        answer = ring.answer(prompt, max_tokens=8)
        assert answer["tokens"] == whole_model_tokens(smollm, prompt, GenerationParams(max_tokens=8)), question
        assert answer["reused"] > (40 if i else -1), (i, answer["reused"])  # the system prompt, at least


def test_prompt_longer_than_a_prefill_chunk_goes_through_the_ring_in_chunks(smollm: LoadedModel,
                                                                           tmp_path: Path) -> None:
    # two layers and an own head: with the head tied to the embedding a random model repeats its last token
    weights = hf_weights(smollm.tokenizer.backend.get_vocab_size(), tie=False)
    model_dir = write_model(tmp_path / "tiny-llama", smollm.tokenizer, weights)
    prompt = list(range(1, 2 * PREFILL_CHUNK + 9))  # two whole chunks and a rest
    expected = whole_model_tokens(load(model_dir), prompt, GenerationParams(max_tokens=8))
    with running_ring(model_dir, [(0, 1), (1, 2)], tmp_path) as ring:
        assert ring.generate(prompt, max_tokens=8) == expected
        stop(ring)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_idle_follower_waits_for_the_ring_without_spinning(ring: RunningRing) -> None:
    before, started = [cpu_seconds(f.pid) for f in ring.followers], time.monotonic()
    time.sleep(2)
    wall = time.monotonic() - started
    for follower, cpu in zip(ring.followers, before, strict=True):
        assert cpu_seconds(follower.pid) - cpu < 0.3 * wall


def test_ranks_leave_with_a_ring_error_when_a_neighbour_dies(model_path: Path, smollm: LoadedModel,
                                                             tmp_path: Path) -> None:
    with running_ring(model_path, RANGES["3-ranks"], tmp_path) as ring:
        ring.followers[0].kill()
        ring.followers[0].wait()
        with pytest.raises(RuntimeError, match="exited"):
            ring.generate(chat(smollm, "Hello"), max_tokens=4)
        assert "connection to a peer was lost" in (tmp_path / "rank0.log").read_text()
        assert ring.followers[1].wait(timeout=10) == RING_LOST
