"""How a chat ends when its runner fails under it (a race `exo soak` found when a node is killed)."""

import anyio
import pytest

from exo.engine.generate import GenerationParams
from exo.shared.errors import ModelError, ServiceUnavailable
from exo.shared.runners import RunnerStatus, TaskKind, TaskStatus
from exo.shared.types import InstanceId, NodeId
from exo.worker.runner.messages import RunnerSpec, StatusChanged, TaskChanged
from exo.worker.supervisor import RunnerHandle, Supervisor

NODE = NodeId("node-a")


class _Stdin:
    async def send(self, frame: bytes) -> None:
        pass


class _Process:
    pid = 1
    stdin = _Stdin()


async def chat_ends_with(runner_fails: bool) -> Exception:
    supervisor = Supervisor(NODE, catalog=None, host="127.0.0.1", dtype="float32",  # type: ignore[arg-type]
                            report=lambda *_: None)
    spec = RunnerSpec(node_id=NODE, instance_id=InstanceId("i1"), rank=0, world_size=2, model_path="", start=0,
                      end=15, n_layers=30, dtype="float32")
    handle = RunnerHandle(spec, NODE, "127.0.0.1", 1, status=RunnerStatus.READY, process=_Process())  # type: ignore[arg-type]
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
