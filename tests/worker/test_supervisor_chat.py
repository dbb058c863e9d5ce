"""How a chat ends when its runner fails or stops under it, or its client stops reading."""

import asyncio

import anyio
import pytest

from exo.shared.errors import ModelError, ServiceUnavailable
from exo.shared.generation import GenerationParams
from exo.shared.runners import RunnerStatus, TaskKind, TaskStatus
from exo.shared.types import InstanceId, NodeId
from exo.worker.handle import HandleEvent, RunnerHandle
from exo.worker.runner.messages import (
    HEADER_SIZE,
    PIPE_CODEC,
    Cancel,
    Generated,
    RunnerSpec,
    StatusChanged,
    TaskChanged,
)
from exo.worker.supervisor import Limits, Supervisor

NODE = NodeId("node-a")


class _Stdin:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    async def send(self, frame: bytes) -> None:
        self.frames.append(frame)


class _Process:
    pid = 1

    def __init__(self) -> None:
        self.stdin = _Stdin()


async def chat_ends_with(runner_fails: bool) -> Exception:
    supervisor = Supervisor(NODE, catalog=None, host="127.0.0.1", dtype="float32",  # type: ignore[arg-type]
                            report=lambda *_: None)
    spec = RunnerSpec(node_id=NODE, instance_id=InstanceId("i1"), rank=0, world_size=2, model_path="", start=0,
                      end=15, n_layers=30, dtype="float32")
    handle = RunnerHandle(spec, NODE, "127.0.0.1", 1, status=RunnerStatus.READY, process=_Process())  # type: ignore[arg-type]
    handle.move(HandleEvent.REPORTED)
    supervisor.runners[handle.runner_id] = handle

    async def runner_answers() -> None:
        while not handle.chats:
            await anyio.sleep(0.001)
        [task_id] = handle.chats
        if runner_fails:  # its ring broke after the chat was queued: the status comes first on the pipe
            supervisor._on_message(handle, StatusChanged(status=RunnerStatus.FAILED, error="ring lost"))
        error = f"a Chat task cannot run while the runner is {handle.status}"
        supervisor._on_message(handle, TaskChanged(task_id=task_id, kind=TaskKind.CHAT, status=TaskStatus.FAILED,
                                                   error=error))

    async with anyio.create_task_group() as tg:
        tg.start_soon(runner_answers)
        with pytest.raises(Exception) as raised:
            async for _ in supervisor.chat(InstanceId("i1"), [1, 2, 3], GenerationParams(max_tokens=4)):
                pass
    return raised.value


async def test_a_chat_whose_runner_failed_under_it_is_a_503_to_retry() -> None:
    error = await chat_ends_with(runner_fails=True)
    assert isinstance(error, ServiceUnavailable) and "is Failed" in str(error)


async def test_a_chat_that_failed_in_a_serving_runner_stays_a_500() -> None:
    assert type(await chat_ends_with(runner_fails=False)) is ModelError


def ready_supervisor(stream_buffer: int = 256) -> tuple[Supervisor, RunnerHandle]:
    supervisor = Supervisor(NODE, catalog=None, host="127.0.0.1", dtype="float32",  # type: ignore[arg-type]
                            report=lambda *_: None, limits=Limits(stream_buffer=stream_buffer))
    spec = RunnerSpec(node_id=NODE, instance_id=InstanceId("i1"), rank=0, world_size=1, model_path="", start=0,
                      end=30, n_layers=30, dtype="float32")
    handle = RunnerHandle(spec, NODE, "127.0.0.1", 1, status=RunnerStatus.READY, process=_Process())  # type: ignore[arg-type]
    handle.move(HandleEvent.REPORTED)
    supervisor.runners[handle.runner_id] = handle
    return supervisor, handle


async def test_frames_for_a_chat_ended_by_a_stop_are_dropped_and_the_chat_gets_a_503() -> None:
    supervisor, handle = ready_supervisor()
    stream = supervisor.chat(InstanceId("i1"), [1, 2, 3], GenerationParams(max_tokens=4))
    first = asyncio.ensure_future(stream.__anext__())
    while not handle.chats:
        await anyio.sleep(0.001)
    [task_id] = handle.chats
    supervisor._on_message(handle, Generated(task_id=task_id, text="a", n_tokens=1))
    assert (await first).text == "a"  # the client now reads slowly: the stream waits at its next piece
    supervisor._stop(handle)
    supervisor._on_message(handle, Generated(task_id=task_id, text="b", n_tokens=2))  # the runner's next frames
    supervisor._on_message(handle, TaskChanged(task_id=task_id, kind=TaskKind.CHAT, status=TaskStatus.CANCELLED))
    with pytest.raises(ServiceUnavailable, match="stopped during the request"):
        await stream.__anext__()
    assert not handle.chats and handle.tasks[task_id].status == TaskStatus.CANCELLED


async def test_a_client_that_leaves_its_buffer_full_gets_an_error_and_the_runner_a_cancel() -> None:
    supervisor, handle = ready_supervisor(stream_buffer=2)
    async with anyio.create_task_group() as tg:
        supervisor._tg = tg
        stream = supervisor.chat(InstanceId("i1"), [1, 2, 3], GenerationParams(max_tokens=64))
        first = asyncio.ensure_future(stream.__anext__())
        while not handle.chats:
            await anyio.sleep(0.001)
        [task_id] = handle.chats
        for n in range(1, 5):  # nobody reads after the first piece is taken
            supervisor._on_message(handle, Generated(task_id=task_id, text="x", n_tokens=n))
        await first
        assert not handle.chats  # its slot is free for other requests
        pieces = [await stream.__anext__(), await stream.__anext__()]
        with pytest.raises(ServiceUnavailable, match="read the stream too slowly"):
            await stream.__anext__()
        assert [p.n_tokens for p in pieces] == [2, 3]
        await anyio.sleep(0.01)
    sent = handle.process.stdin.frames  # type: ignore[union-attr]
    cancels = [m for m in map(PIPE_CODEC.decode, (f[HEADER_SIZE:] for f in sent)) if isinstance(m, Cancel)]
    assert [c.task_id for c in cancels] == [task_id]
