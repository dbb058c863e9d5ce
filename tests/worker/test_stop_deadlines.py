"""Every step of stopping a runner has a deadline: a process that ignores the node is still ended."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import anyio
import pytest

from exo.shared.runners import TaskKind
from exo.shared.types import InstanceId, NodeId
from exo.worker.handle import HandleEvent, RunnerHandle
from exo.worker.runner.messages import RunnerSpec, Task
from exo.worker.supervisor import Limits, Supervisor

DEAF = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
POLITE = "import sys; sys.stdin.read()"  # exits when its stdin ends


async def ended_by(script: str, *, hang: bool = False) -> tuple[int | None, list[str]]:
    supervisor = Supervisor(NodeId("a"), catalog=None, host="127.0.0.1", dtype="float32",  # type: ignore[arg-type]
                            report=lambda *_: None)
    supervisor._grace = 0.3
    spec = RunnerSpec(node_id="a", instance_id=InstanceId("i1"), rank=0, world_size=1, model_path="", start=0,
                      end=4, n_layers=4, dtype="float32")
    process = await anyio.open_process([sys.executable, "-c", script], stdin=subprocess.PIPE)
    handle = RunnerHandle(spec, NodeId("a"), "127.0.0.1", 1, process=process)
    handle.move(HandleEvent.REPORTED)
    handle.move(HandleEvent.RESTART)
    await anyio.sleep(0.2)  # let the interpreter start and ignore SIGTERM
    if hang:
        os.kill(process.pid, signal.SIGSTOP)
    warnings: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("exo.worker.supervisor.log.warning", lambda msg, *args: warnings.append(msg % args))
        with anyio.fail_after(5):
            await supervisor._end_process(handle, process, Task(task_id="s", kind=TaskKind.SHUTDOWN))
    return process.returncode, warnings


async def test_a_runner_that_exits_when_asked_is_neither_terminated_nor_killed() -> None:
    code, warnings = await ended_by(POLITE)
    assert code == 0 and warnings == []


async def test_a_runner_that_ignores_the_request_and_sigterm_is_killed() -> None:
    code, warnings = await ended_by(DEAF)
    assert code == -signal.SIGKILL
    assert [w.rsplit(": ", 1)[-1] for w in warnings] == ["terminate", "kill"]


async def test_a_stopped_runner_that_reads_nothing_is_killed() -> None:
    code, warnings = await ended_by(POLITE, hang=True)
    assert code == -signal.SIGKILL and len(warnings) == 2


async def test_a_runner_past_its_restarts_is_given_up_and_counted() -> None:
    supervisor = Supervisor(NodeId("a"), catalog=None, host="127.0.0.1", dtype="float32",  # type: ignore[arg-type]
                            report=lambda *_: None, limits=Limits(max_restarts=0))
    spec = RunnerSpec(node_id="a", instance_id=InstanceId("i1"), rank=0, world_size=1, model_path="", start=0,
                      end=4, n_layers=4, dtype="float32")
    handle = RunnerHandle(spec, NodeId("a"), "127.0.0.1", 1)
    handle.move(HandleEvent.EXITED)  # it died on its own
    await supervisor._respawn(handle)
    assert handle.gave_up and (supervisor.give_ups, supervisor.restarts) == (1, 0)  # exo_runner_give_ups_total
