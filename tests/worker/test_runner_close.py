"""A chat's token stream is closed by the runner itself, so what closing it raises fails the task.

Closing a pipeline head's stream finishes the step in flight on the ring. When a neighbour died
meanwhile, that raises: the soak runs once saw it only as "Exception ignored in generator", with the
chat reported cancelled and the runner still Ready on a lost ring.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Generator
from pathlib import Path

import pytest

from exo.engine.loading import LoadedModel
from exo.shared.generation import GenerationParams
from exo.shared.runners import RunnerStatus, TaskKind, TaskStatus
from exo.worker.runner.messages import Generated, RunnerSpec, StatusChanged, Task, TaskChanged, read_frame
from exo.worker.runner.runner import Runner

LOST = "[ring] connection to a peer was lost"


class LostRing:
    """The head's view of a ring whose right neighbour dies while the first tokens are out."""

    def __init__(self) -> None:
        self.lost: str | None = None
        self.closed = False

    def generate_step(self, prompt: tuple[int, ...], params: GenerationParams) -> Generator[int, None, None]:
        try:
            while True:
                yield 1425  # " the"
        except GeneratorExit:  # finishing the step in flight reads from the dead neighbour, as PipelineHead does
            self.closed = True
            self.lost = LOST
            raise RuntimeError(LOST) from None


def messages(out: io.BytesIO) -> list[object]:
    out.seek(0)
    found = []
    while (message := read_frame(out)) is not None:
        found.append(message)
    return found


@pytest.fixture
def head_runner(smollm: LoadedModel, model_path: Path) -> tuple[Runner, LostRing, io.BytesIO]:
    spec = RunnerSpec(node_id="n", instance_id="i", rank=0, world_size=2, model_path=str(model_path),
                      start=0, end=15, n_layers=30, dtype="float32")
    out = io.BytesIO()
    runner = Runner(spec, out)
    ring = LostRing()
    runner.loaded, runner.head, runner.ring = smollm, ring, ring  # type: ignore[assignment]
    runner.status = RunnerStatus.READY
    return runner, ring, out


def test_cancelled_chat_on_a_ring_lost_mid_close_fails_the_task_and_the_runner(
        head_runner: tuple[Runner, LostRing, io.BytesIO], monkeypatch: pytest.MonkeyPatch) -> None:
    runner, ring, out = head_runner
    ignored: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    task = Task(task_id="chat-1", kind=TaskKind.CHAT, prompt=(1, 2, 3), params=GenerationParams(max_tokens=50))
    send = runner._send

    def client_cancels_after_the_first_text(message: object) -> None:
        send(message)  # type: ignore[arg-type]
        if isinstance(message, Generated):
            runner._cancelled.add(task.task_id)

    monkeypatch.setattr(runner, "_send", client_cancels_after_the_first_text)

    runner._run(task)

    assert ring.closed and not ignored
    said = messages(out)
    assert TaskChanged(task_id="chat-1", kind=TaskKind.CHAT, status=TaskStatus.FAILED,
                       error=f"RuntimeError: {LOST}") in said
    assert StatusChanged(status=RunnerStatus.FAILED, error=f"ring lost: {LOST}") in said
    assert runner.status == RunnerStatus.FAILED


def test_chat_that_ends_closes_its_token_stream_before_the_task_completes(
        head_runner: tuple[Runner, LostRing, io.BytesIO]) -> None:
    runner, ring, out = head_runner
    task = Task(task_id="chat-2", kind=TaskKind.CHAT, prompt=(1, 2, 3), params=GenerationParams(max_tokens=3))

    runner._run(task)

    assert ring.closed  # a lost ring here fails the task too, rather than surfacing in a later one
    assert TaskChanged(task_id="chat-2", kind=TaskKind.CHAT, status=TaskStatus.FAILED,
                       error=f"RuntimeError: {LOST}") in messages(out)
